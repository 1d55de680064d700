"""The instrumented pass: where a round's time goes.

The production round (`step.speculative_step`) runs inside one fused `while_loop`, so its stages
cannot be timed there. This pass runs the same rounds on the same states with each stage jitted
on its own (caches donated, as the fused loop updates them in place) and a `block_until_ready`
between stages:

    draft    the head forward: embed [root, MASK x (Bs-1)], head layers, target lm_head -> (B, D, V)
    tree     `build_tree` (AR: the one-node tree)
    verify   the target forward over the tree's N tokens
    commit   acceptance, KV commit, head-context append, state update

The stages are the functions the fused round itself calls (`step.draft_logits`, `build_tree`,
`step.verify`, `step.commit`); the pass also checks that it emits exactly the ids of the fused run.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax

from jetspec_jax import step
from jetspec_jax.decode import results, start
from jetspec_jax.step import DecodeConfig
from jetspec_jax.benchmark.measure import count_compiles

STAGES = ("draft", "tree", "verify", "commit")
FORWARDS = ("draft", "verify")  # the two model forwards; everything else is overhead


# Each stage of `step.speculative_step`, jitted on its own (caches donated as in the fused loop).
draft_stage = jax.jit(step.draft_logits, static_argnames=("config",), donate_argnames=("head_cache",))
verify_stage = jax.jit(step.verify, static_argnames=("config",), donate_argnames=("cache",))
commit_stage = jax.jit(lambda *a, config: step.commit(*a, config)[0], static_argnames=("config",),
                       donate_argnums=(1,))


@functools.partial(jax.jit, static_argnames=("config",))
def make_tree(params, state, logits, config: DecodeConfig):
    """`step.tree_from_logits` (`build_tree`), or AR's one-node tree when there is no draft."""
    if config.tree is None:
        return step.root_only_tree(state.root)
    return step.tree_from_logits(params, state, logits, config)


def _round(params, state, config: DecodeConfig, seconds: dict):
    """One round, stage by stage; adds each stage's wall time to `seconds`."""
    clock = time.perf_counter
    t0 = t1 = clock()
    logits = None  # AR: no draft stage
    if config.head is not None:
        logits, head_cache = jax.block_until_ready(
            draft_stage(params, state.root, state.head_cache, config=config))
        state = state.replace(head_cache=head_cache)
        t1 = clock()
    tree = jax.block_until_ready(make_tree(params, state, logits, config=config))
    t2 = clock()
    v_logits, features, cache = jax.block_until_ready(
        verify_stage(params, state.target_cache, tree, config=config))
    t3 = clock()
    state = jax.block_until_ready(
        commit_stage(params, state.replace(target_cache=cache), tree, v_logits, features, config=config))
    t4 = clock()
    for name, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
        seconds[name] += dt
    return state


@dataclasses.dataclass
class Split:
    """Stage times summed over the rounds of one or more prompts."""

    seconds: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    rounds: int = 0
    ids_match: bool = True  # the pass emitted exactly the fused run's ids
    compiles: int = 0  # compilations inside the timed rounds (0 after warm-up)

    def add(self, other: "Split") -> None:
        for k in STAGES:
            self.seconds[k] += other.seconds[k]
        self.rounds += other.rounds
        self.ids_match &= other.ids_match
        self.compiles += other.compiles

    def summary(self, fused_round_s: float | None = None) -> dict:
        """ms per round per stage, shares of the round, and the overhead beyond the two forwards."""
        total = sum(self.seconds.values())
        per = lambda s: 1e3 * s / max(1, self.rounds)  # noqa: E731
        out = {
            "rounds": self.rounds,
            "ms_per_round": {k: round(per(v), 4) for k, v in self.seconds.items()},
            "share_pct": {k: round(100 * v / total, 2) if total else None
                          for k, v in self.seconds.items()},
            "round_ms": round(per(total), 4),
            "overhead_pct": round(100 * (1 - sum(self.seconds[k] for k in FORWARDS) / total), 2)
            if total else None,
            "ids_match_fused": self.ids_match,
            "compiles_timed": self.compiles,
        }
        if fused_round_s:
            forwards = sum(per(self.seconds[k]) for k in FORWARDS) / 1e3
            out["fused_round_ms"] = round(1e3 * fused_round_s, 4)
            out["fused_overhead_pct"] = round(100 * (1 - forwards / fused_round_s), 2)
        return out


def split_prompt(params, ids, config: DecodeConfig, *, max_new_tokens, stop_ids, expected_ids) -> Split:
    """Instrumented rounds for one prompt, after an untimed warm-up round on a fresh state."""
    params = step.with_draft_table(params, config)  # as `decode` does once per call
    begin = lambda: start(params, [ids], config, max_new_tokens=max_new_tokens, stop_ids=stop_ids)  # noqa: E731
    _round(params, begin(), config, dict.fromkeys(STAGES, 0.0))  # compiles the stages
    out = Split()
    state = jax.block_until_ready(begin())
    with count_compiles() as c:
        for _ in range(max_new_tokens):  # every round emits >= 1 token
            if jax.device_get(state.done)[0]:
                break
            state = _round(params, state, config, out.seconds)
    gen = results(state)[0]
    out.rounds, out.compiles = gen.rounds, c["n"]
    out.ids_match = gen.ids == list(expected_ids)
    return out
