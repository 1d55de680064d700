"""The measuring loop of the harness: every engine, then the time split, on one prompt at a time.

    sweep = Sweep(params, configs, peers, runner, args, stop_ids, say)
    for label in sweep.ours(set_name, prompt): ...     # our configs, AR first; yields as it goes
    for label in sweep.others(set_name, prompt): ...   # the peers
    for label in sweep.split(set_name, prompt): ...    # the instrumented pass (split.py)
    for label in sweep.batched(set_name, prompts, 4): ...  # our configs on groups of 4 prompts

Rows are plain dicts (see report.py); each speculative (or batched) output is compared with
batch-1 greedy AR of the same prompt as it is produced, and a mismatch is printed at once.
"""

from __future__ import annotations

from jetspec_jax.benchmark.split import Split, split_prompt


def _first_difference(a, b) -> str:
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"first difference at token {k} (speculative {a[k] if k < len(a) else 'end'}, "
            f"ar {b[k] if k < len(b) else 'end'})")


def _times(t) -> dict:
    """The timing fields of a row from a measure.Timed."""
    return dict(seconds=round(t.seconds, 5), prefill_s=round(t.prefill_s, 5),
                decode_s=round(t.decode_s, 5), compiles=t.compiles)


class Sweep:
    """Runs every engine on every prompt and collects per-prompt rows, mismatches and agreement."""

    def __init__(self, params, configs, peers, runner, args, stop_ids, say):
        self.params, self.configs, self.peers, self.runner = params, configs, peers, runner
        self.args, self.stop_ids, self.say = args, stop_ids, say
        self.runs = {}  # (set, label) -> run dict (see benchmark/report.py)
        self.batched_runs = {}  # (set, label, batch size > 1) -> run dict whose rows are groups
        self.rows = {}  # (label, set, index) -> our timed row
        self.ar_ids = {}  # (set, index) -> greedy AR ids
        self.mismatches, self.agreement = [], {}
        self.splits = {}  # label -> (Split pooled over prompts, the fused rows of those prompts)

    def _add(self, name, label, engine, mode, budget, config, row, batch_size=1):
        tree = config.tree if config is not None else None
        runs, key = ((self.runs, (name, label)) if batch_size == 1
                     else (self.batched_runs, (name, label, batch_size)))
        run = runs.setdefault(key, {
            "set": name, "label": label, "engine": engine, "mode": mode, "budget": budget,
            "width": tree.width if tree else None, "depth": tree.depth if tree else None,
            **({"batch_size": batch_size} if batch_size > 1 else {}), "prompts": []})
        run["prompts"].append(row)

    def _equal_to_ar(self, name, index, label, ids) -> bool:
        """ids == greedy AR of the prompt; a difference is recorded and printed at once."""
        ar = self.ar_ids[name, index]
        if ids == ar:
            return True
        detail = _first_difference(ids, ar)
        self.mismatches.append({"set": name, "prompt": index, "config": label, "detail": detail})
        self.say(f"MISMATCH: {name} prompt {index} {label}: {detail}")
        return False

    def ours(self, name, p):
        """Every config of the sweep on prompt p (AR first: it is the equality reference)."""
        for label, mode, budget, config in self.configs:
            t = self.runner.run(p.ids, config, self.args.repeats)
            if mode == "ar":
                self.ar_ids[name, p.index] = t.ids
            equal = None if mode == "ar" else self._equal_to_ar(name, p.index, label, t.ids)
            row = dict(index=p.index, prompt_tokens=len(p.ids), new_tokens=len(t.ids),
                       rounds=len(t.accept_lengths), tau_tokens=len(t.ids), **_times(t),
                       equal_to_ar=equal)
            if mode == "ar" or not equal:
                row["ids"] = t.ids
            self.rows[label, name, p.index] = row
            self._add(name, label, "jetspec", mode, budget, config, row)
            yield label

    def batched(self, name, prompts, batch_size):
        """Every config on consecutive groups of `batch_size` prompts, one fused loop per group.

        A short last group is padded by repeating its prompts; padded rows are not counted. A row
        of the run is a group: new tokens and rounds summed over its real rows (so tau keeps its
        batch-1 meaning), loop_rounds the loop's iterations; every real row is checked against
        batch-1 greedy AR (`ours` must have run on these prompts).
        """
        for first in range(0, len(prompts), batch_size):
            group = prompts[first: first + batch_size]
            rows = ([p.ids for p in group] * batch_size)[:batch_size]  # padded by repeats
            for label, mode, budget, config in self.configs:
                tag = f"{label} B={batch_size}"
                t = self.runner.run_batch(rows, config, self.args.repeats)
                real = t.rows[: len(group)]
                equal = [self._equal_to_ar(name, p.index, tag, g.ids) for p, g in zip(group, real)]
                tokens = sum(len(g.ids) for g in real)
                row = dict(indices=[p.index for p in group], new_tokens=tokens,
                           rounds=sum(g.rounds for g in real), tau_tokens=tokens,
                           loop_rounds=max(g.rounds for g in t.rows), **_times(t),
                           equal_to_ar=all(equal))
                self._add(name, label, "jetspec", mode, budget, config, row, batch_size)
                yield f"{tag} #{group[0].index}-{group[-1].index}"

    def others(self, name, p):
        """Every peer on prompt p; agreement with our AR is informational."""
        for peer_name, peer in self.peers.items():
            r = peer.run(p.ids, self.args.max_new_tokens, self.stop_ids)
            same = r.ids == self.ar_ids[name, p.index]
            a = self.agreement.setdefault(peer_name, {"checked": 0, "equal": 0})
            a["checked"], a["equal"] = a["checked"] + 1, a["equal"] + same
            # A peer's prefill already yields the first token: tau counts the rest per round.
            row = dict(index=p.index, prompt_tokens=len(p.ids), new_tokens=len(r.ids),
                       rounds=r.rounds, seconds=round(r.seconds, 5), agrees_with_ar=same,
                       tau_tokens=len(r.ids) - 1)
            if not same:
                row["ids"] = r.ids
            self._add(name, peer_name, peer_name, peer_name, None, None, row)
            yield peer_name

    def split(self, name, p):
        """The instrumented pass of every config on prompt p (see split.py)."""
        for label, _, _, config in self.configs:
            row = self.rows[label, name, p.index]
            part = split_prompt(self.params, p.ids, config, max_new_tokens=self.args.max_new_tokens,
                                stop_ids=self.stop_ids,
                                expected_ids=row.get("ids", self.ar_ids[name, p.index]))
            split, rows = self.splits.setdefault(label, (Split(), []))
            split.add(part)
            rows.append(row)
            yield f"{label} (split)"
