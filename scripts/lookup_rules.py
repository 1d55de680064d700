"""Which prompt-lookup rule and how many nodes, measured on the held-out validation split (no decoding).

    python scripts/lookup_rules.py --config configs/smollm2-135m-stage12.yaml \
        --head jetspec_jax/heads/smollm2-135m-causal --budgets 4,8,16

At the split's fixed anchors (those of `scripts/val_heads.py`), the head's draft logits are computed once;
then for every budget N and lookup length L (0, 2, N-1) and every match rule, the tree `speculative_step`
would build with all L branch nodes (library `build_tree`: the match's continuation as a forced chain where
one is found, else the head's own N-node tree; decoding since takes fewer of them per row, see
`lookup.branch_nodes` and scripts/branch_split.py) is scored against the stored greedy answer
(`validate.accepted_depth`). The rules are host searches over the text up to the anchor:

    latest-3/2   the latest earlier occurrence of the last 3 tokens, else of the last 2 (the rule until
                 2026-12-07)
    longest      the earlier occurrence sharing the longest suffix (up to lookup.MAX_MATCH tokens, at
                 least lookup.MIN_MATCH; the latest of equally long ones): the library's rule

Prints a markdown table of tau (bonus token included); --json writes it.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from jetspec_jax.errors import UserError


def latest_ngram(text, c, length, sizes=(3, 2)):
    for n in sizes:
        if c < n - 1:
            continue
        suffix = list(text[c - n + 1 : c + 1])
        for j in range(c - 1, n - 2, -1):
            if list(text[j - n + 1 : j + 1]) == suffix:
                return [int(text[j + 1 + k % (c - j)]) for k in range(length)]
    return None


def longest_suffix(text, c, length):
    from jetspec_jax.lookup import MAX_MATCH, MIN_MATCH

    best, best_j = 0, None
    for j in range(c - 1, -1, -1):
        k = 0
        while k < MAX_MATCH and j - k >= 0 and text[j - k] == text[c - k]:
            k += 1
        if k > best:
            best, best_j = k, j
    if best < MIN_MATCH:
        return None
    return [int(text[best_j + 1 + k % (c - best_j)]) for k in range(length)]


RULES = {"latest-3/2": latest_ngram, "longest": longest_suffix}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="training config with a features section")
    p.add_argument("--head", required=True, help="head directory")
    p.add_argument("--budgets", default="4,8,16")
    p.add_argument("--max-sequences", type=int, default=None, help="first K validation sequences")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
        if min(budgets) < 3:
            raise UserError("--budgets must be >= 3")
        rows = run(args, budgets)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| N | lookup nodes | rule | found | tau |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['lookup']} | {r['rule']} | {r['found']:.3f} | {r['tau']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def run(args, budgets) -> list:
    import jax
    import jax.numpy as jnp

    from jetspec_jax.train.validate import accepted_depth, anchor_logits, open_validation, scoring_head
    from jetspec_jax.tree import TreeConfig, build_tree

    split = open_validation(args.config, args.max_sequences)
    model = split.model
    head_cfg, params, vocab, objective = scoring_head(args.head, model.config)
    depth = min(head_cfg.block_size - 1, max(budgets) - 1)
    logits_of = jax.jit(lambda *a: anchor_logits(*a, objective))
    texts, roots, logits, labels = [], [], [], []
    for batch in split.batches(head_cfg.target_layer_ids):
        anchors, counted, lg, lb = jax.device_get(logits_of(params, model.params, batch.tokens, batch.lengths,
                                                            batch.prompt_lens, batch.features, vocab))
        tokens = np.asarray(batch.tokens)
        for r in np.flatnonzero(counted):
            b, a = divmod(int(r), anchors.shape[1])
            c = int(anchors[b, a])
            texts.append((tokens[b, : c + 1], c))
            roots.append(tokens[b, c])
        logits.append(lg[counted][:, :depth])
        labels.append(lb[counted][:, :depth])
    logits, labels = jnp.asarray(np.concatenate(logits)), jnp.asarray(np.concatenate(labels))
    roots = jnp.asarray(np.array(roots, np.int32))
    column_ids = None if vocab is None else vocab["d2t"]
    found, forced = {}, {}
    for rule, search in RULES.items():
        conts = [search(text, c, depth) for text, c in texts]
        found[rule] = np.array([x is not None for x in conts])
        forced[rule] = np.array([x if x is not None else [0] * depth for x in conts], np.int32)
    rows = []
    for n in budgets:
        d = min(depth, n - 1)
        for nodes in sorted({0, 2, n - 1} & set(range(0, d + 1))):
            for rule in RULES if nodes else ["-"]:
                tree_cfg = TreeConfig(budget=n, width=4, depth=d, lookup=nodes)
                f = None if not nodes else jnp.asarray(forced[rule][:, :nodes])
                got = None if not nodes else jnp.asarray(found[rule] * nodes, jnp.int32)  # all L or none
                tree = build_tree(roots, logits[:, :d], tree_cfg, f, column_ids, got)
                acc = np.asarray(accepted_depth(tree.tokens, tree.depths, tree.mask, labels[:, :d]))
                rows.append({"budget": n, "lookup": nodes, "rule": rule, "anchors": len(acc),
                             "found": float(found[rule].mean()) if nodes else 0.0, "tau": 1 + float(acc.mean())})
                print(rows[-1], file=sys.stderr)
    return rows


if __name__ == "__main__":
    sys.exit(main())
