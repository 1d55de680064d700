"""How many of the lookup branch's nodes a row should take, by where its branch comes from.

    python scripts/branch_split.py --config configs/smollm2-135m-stage13.yaml \
        --head jetspec_jax/heads/smollm2-135m-causal --budgets 4,8,16 --json docs/val/branch-split.json

With `--lookup all` a round's tree is the lookup branch (lookup.py: the text's own continuation, else the
head's answer n-gram table) in up to L = N-1 nodes and the head's best nodes in the rest. For every anchor
and every split l = 0..L (l branch nodes, N-1-l head nodes; library `build_tree`) the accepted length is
scored against the target's stored greedy answer (`validate.accepted_depth`), grouped by the branch's source
(`lookup.branch_continuations`: TEXT, a match of >= SHORT_MATCH tokens; SHORT; TABLE; NONE). Because a
row's split depends only on its source, the best l per source on the validation split is the best rule of
that kind; the table shows tau per source and l, and three rules: every branch node (the rule until
2026-12-07), the library's (`lookup.branch_nodes`) and the per-source best, and a bound no rule can pass on the
validation split: the best split at every anchor (on the evaluation sets: the walk that takes it every round).

The decision is made on the validation split (the anchors of `scripts/val_heads.py`). `--eval-sets` also
scores the three rules on the evaluation sets' greedy answers (first K prompts, M new tokens) by walking
rounds: from the first root, a round accepts the tree's accepted length plus the bonus token, exactly as
`scripts/eval_tau.py` decodes (the same tau to 2 decimals), but every split is scored from one pass.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from jetspec_jax.errors import UserError

SOURCES = ("none", "table", "short", "text", "table_low")  # lookup.NONE, TABLE, SHORT, TEXT, TABLE_LOW (tests/test_lookup.py checks)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="training config with a features section")
    p.add_argument("--head", required=True, help="head directory")
    p.add_argument("--budgets", default="4,8,16")
    p.add_argument("--max-sequences", type=int, default=None, help="first K validation sequences")
    p.add_argument("--eval-sets", default="", help="also these evaluation sets, e.g. math500,humaneval,mtbench")
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
        if min(budgets) < 3:
            raise UserError("--budgets must be >= 3")
        report = run(args, budgets)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def run(args, budgets) -> dict:
    import jax

    from jetspec_jax.lookup import branch_nodes
    from jetspec_jax.train.validate import open_validation, scoring_head

    split = open_validation(args.config, args.max_sequences)
    head_cfg, params, vocab, objective = scoring_head(args.head, split.model.config)
    depth = min(head_cfg.block_size - 1, max(budgets) - 1)
    scorer = _Scorer(params, split.model, vocab, objective, depth, budgets)
    val = scorer.validation(split)
    rules = {}
    for n in budgets:
        L = min(depth, n - 1)
        library = np.asarray(branch_nodes(np.arange(len(SOURCES)), L)).tolist()
        best = [library[s] if m is None else int(np.argmax(m)) for s, m in enumerate(val["mean"][n])]  # a source no anchor has: the library's
        rules[n] = {"all": [0] + [L] * (len(SOURCES) - 1), "library": library, "best on validation": best}
    report = {"head": args.head, "config": args.config, "anchors": int(len(val["source"])),
              "share": {s: float(np.mean(val["source"] == i)) for i, s in enumerate(SOURCES)},
              "budgets": {}}
    for n in budgets:
        row = {"tau_by_source_and_split": {SOURCES[s]: None if m is None else [round(1 + x, 4) for x in m]
                                           for s, m in enumerate(val["mean"][n])},
               "rules": {}}
        for name, nodes in rules[n].items():
            acc = val["acc"][n][np.arange(len(val["source"])), np.asarray(nodes)[val["source"]]]
            row["rules"][name] = {"nodes_by_source": dict(zip(SOURCES, nodes)), "val_tau": round(1 + acc.mean(), 4)}
        row["per_anchor_best"] = {"val_tau": round(1 + val["acc"][n].max(1).mean(), 4)}
        report["budgets"][n] = row
    if args.eval_sets:
        for set_name, got in scorer.evaluation(args.eval_sets.split(","), args.num_prompts, args.max_new_tokens).items():
            report[f"share_{set_name}"] = {s: float(np.mean(got["source"] == i)) for i, s in enumerate(SOURCES)}
            for n in budgets:
                for name, nodes in rules[n].items():
                    split = np.asarray(nodes)[got["source"]]
                    acc = got[f"acc_{n}"][np.arange(len(split)), split]
                    report["budgets"][n]["rules"][name][f"tau_{set_name}"] = round(_walk(acc, got["seq"]), 3)
                best = report["budgets"][n]["per_anchor_best"]
                best[f"tau_{set_name}"] = round(_walk(got[f"acc_{n}"].max(1), got["seq"]), 3)
    jax.clear_caches()
    return report


class _Scorer:
    """Accepted length of every split l = 0..min(D, N-1) at every anchor, and the branch's source."""

    def __init__(self, params, model, vocab, objective, depth, budgets):
        import jax
        import jax.numpy as jnp

        from jetspec_jax.lookup import branch_continuations
        from jetspec_jax.train.validate import accepted_depth
        from jetspec_jax.tree import TreeConfig, build_tree

        self.params, self.model, self.vocab, self.objective = params, model, vocab, objective
        column_ids = None if vocab is None else vocab["d2t"]
        orders = objective.head.ngram_orders

        def score(roots, logits, labels, history, pos):
            source, forced = branch_continuations(history, pos, depth, params, orders)
            out = {"source": source}
            for n in budgets:
                d = min(depth, n - 1)
                cfg = TreeConfig(budget=n, width=4, depth=d, lookup=d)
                out[f"acc_{n}"] = jnp.stack([accepted_depth(*_fields(build_tree(
                    roots, logits[:, :d], cfg, forced[:, :d], column_ids, jnp.full(roots.shape, l, jnp.int32))),
                    labels[:, :d]) for l in range(d + 1)], axis=1)
            return out

        self.score = jax.jit(score)

    def validation(self, split) -> dict:
        import jax
        import jax.numpy as jnp

        from jetspec_jax.train.validate import anchor_logits

        logits_of = jax.jit(lambda *a: anchor_logits(*a, self.objective))
        parts = []
        for batch in split.batches(self.objective.head.target_layer_ids):
            anchors, counted, logits, labels = logits_of(self.params, self.model.params, batch.tokens, batch.lengths,
                                                         batch.prompt_lens, batch.features, self.vocab)
            a = anchors.shape[1]
            roots = jnp.take_along_axis(batch.tokens, anchors, axis=1).reshape(-1)
            got = jax.device_get(self.score(roots, logits, labels, jnp.repeat(batch.tokens, a, axis=0),
                                            anchors.reshape(-1)))
            keep = np.asarray(counted)
            parts.append({k: np.asarray(v)[keep] for k, v in got.items()})
        return _means(_concat(parts))

    def evaluation(self, names, num_prompts, max_new_tokens) -> dict:
        import jax
        import jax.numpy as jnp

        from jetspec_jax.benchmark.sources import prompt_sets_from_names
        from jetspec_jax.decode import generate
        from jetspec_jax.model import for_cpu_decoding
        from jetspec_jax.step import DecodeConfig
        from jetspec_jax.train.objective import target_features
        from jetspec_jax.train.validate import logits_at

        model, obj = self.model, self.objective

        @jax.jit
        def logits_at_every_position(tokens, n, p):
            length = tokens.shape[1]
            features, _ = target_features(obj, model.params, tokens)
            anchors = jnp.arange(length, dtype=jnp.int32)[None]
            ok = (anchors >= p - 1) & (anchors <= n - 2)  # every round's possible root
            return logits_at(self.params, model.params, tokens, n[None], p[None], features,
                             jnp.where(ok, anchors, 0), ok, self.vocab, obj)

        target = for_cpu_decoding(model.config, model.params)
        out = {}
        for set_name, prompts in prompt_sets_from_names(names, model.tokenizer, num_prompts).items():
            ids = [q.ids for q in prompts]
            answers = generate({"target": target}, ids, DecodeConfig(target=model.config),
                               max_new_tokens=max_new_tokens, stop_ids=model.eos_ids)
            parts = []
            for k, (prompt, answer) in enumerate(zip(ids, answers)):
                seq = np.array(list(prompt) + list(answer.ids), np.int32)
                size = 256
                while size < len(seq) + 16:
                    size *= 2  # a few padded shapes, so a few compilations
                tokens = np.zeros((1, size), np.int32)
                tokens[0, : len(seq)] = seq
                logits, labels = logits_at_every_position(jnp.asarray(tokens), jnp.int32(len(seq)), jnp.int32(len(prompt)))
                pos = jnp.arange(size, dtype=jnp.int32)
                got = jax.device_get(self.score(tokens[0], logits, labels, jnp.repeat(tokens, size, axis=0), pos))
                rounds = slice(len(prompt) - 1, len(seq) - 1)  # roots of the rounds that produce the answer
                part = {key: np.asarray(v)[rounds] for key, v in got.items()}
                part["seq"] = np.full(rounds.stop - rounds.start, k)
                parts.append(part)
            out[set_name] = _concat(parts)
            print(f"{set_name}: {len(ids)} answers scored", file=sys.stderr)
        return out


def _fields(tree):
    return tree.tokens, tree.depths, tree.mask


def _concat(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _means(got: dict) -> dict:
    """{"source" (R,), "acc" {N: (R, l)}, "mean" {N: [per source: mean accepted per split, or None]}}."""
    source = got["source"]
    accs = {int(k[4:]): v for k, v in got.items() if k.startswith("acc_")}
    mean = {n: [acc[source == s].mean(0) if np.any(source == s) else None for s in range(len(SOURCES))]
            for n, acc in accs.items()}
    return {"source": source, "acc": accs, "mean": mean}


def _walk(acc, seq) -> float:
    """Tokens per round when each round starts where the last one's accepted tokens and bonus end."""
    tokens = rounds = 0
    for s in np.unique(seq):
        a = acc[seq == s]
        i = 0
        while i < len(a):
            i += int(a[i]) + 1
            rounds += 1
        tokens += len(a)
    return tokens / max(rounds, 1)


def markdown(report) -> str:
    lines = [f"{report['anchors']} validation anchors; branch source shares: "
             + ", ".join(f"{k} {v:.3f}" for k, v in report["share"].items()), ""]
    for key in sorted(k for k in report if k.startswith("share_")):
        lines += [f"{key[6:]} answer positions, branch source shares: " + ", ".join(f"{k} {v:.3f}" for k, v in report[key].items()), ""]
    for n, row in report["budgets"].items():
        lines += [f"N={n}: tau on the validation split by source and branch nodes l = 0, 1, ...", ""]
        for s, taus in row["tau_by_source_and_split"].items():
            if taus is not None:
                lines.append(f"- {s}: " + " ".join(f"{t:.2f}" for t in taus))
        evals = sorted({k for r in row["rules"].values() for k in r if k.startswith("tau_")})
        lines += ["", f"| rule | nodes ({', '.join(SOURCES)}) | validation tau |"
                  + "".join(f" {e[4:]} |" for e in evals), "|---|---|---|" + "---|" * len(evals)]
        for name, r in row["rules"].items():
            lines.append(f"| {name} | {list(r['nodes_by_source'].values())} | {r['val_tau']:.3f} |"
                         + "".join(f" {r[e]:.2f} |" for e in evals))
        r = row["per_anchor_best"]  # the best split at every anchor: no rule of any kind does better
        lines.append(f"| per-anchor best (bound) | - | {r['val_tau']:.3f} |" + "".join(f" {r[e]:.2f} |" for e in evals))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
