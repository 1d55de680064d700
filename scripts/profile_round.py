"""Where a decoding round's time goes on this machine, each stage timed inside one compiled loop.

    python scripts/profile_round.py [--model smollm2-135m] [--budget 4] [--lookup 2] [--iters 40]

The bench's instrumented split (`jetspec_jax.bench`) jits each stage separately and pays a
dispatch and a copy of the state per stage; here every measurement is a `fori_loop` of `--iters`
repetitions of one stage inside one program (the carry threads through each repetition so nothing
is hoisted), on a real state: the default model and head after prefilling a MATH-style prompt and
decoding a few rounds. Stages: the target forward over 1..N rows (with and without the LM head),
the head's draft, the tree build, accept+commit, the prompt's prefill, the fused AR step and the
fused speculative round; the last two and the prefill again with the weights as loaded (no packed
layouts, `step.prepare_params`: the layers' (K, N) kernels, the LM head from the tied embedding),
and the AR step and round with XLA's attention instead of the CPU kernel. Times are the median of
`--samples` runs of the loop, per repetition, in ms; ratios are against the AR step of the same
run.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from jetspec_jax.benchmark.measure import machine
from jetspec_jax.decode import decode, prefill, prefill_inputs, start
from jetspec_jax.head import check_head_fits
from jetspec_jax.loading import load_model
from jetspec_jax.loading.head_io import load_head_dir
from jetspec_jax.cli import default_head_path
from jetspec_jax.model import Transformer
from jetspec_jax.step import (DecodeConfig, commit, draft_logits, draft_table, prepare_params, speculative_step,
                              tree_from_logits, verify)
from jetspec_jax.tree import Tree, TreeConfig

PROMPT = ("Solve the problem step by step. Problem: Find the number of ordered pairs of positive integers "
          "(a, b) such that a + b = 1000 and neither a nor b has a zero digit. Explain each step carefully, "
          "then state the final answer in a box.")


def timed_round_robin(cases, samples):
    """{name: (fn, args)} -> {name: median wall seconds}. Every case is compiled and run once, then
    the cases are timed in turn, `samples` times over, so that slow drifts of the machine's load
    hit them alike."""
    for fn, args in cases.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in cases}
    for _ in range(samples):
        for name, (fn, args) in cases.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t) for name, t in times.items()}


def chain_tree(root, n):
    """A chain of n nodes (root + n-1 copies of it): the shape and mask of an N-row verify."""
    b = root.shape[0]
    return Tree(tokens=jnp.broadcast_to(root[:, None], (b, n)).astype(jnp.int32),
                parents=jnp.broadcast_to(jnp.arange(-1, n - 1, dtype=jnp.int32), (b, n)),
                depths=jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)),
                mask=jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (b, n, n)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budget", type=int, default=4)
    p.add_argument("--lookup", type=int, default=2)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--rows", default="1,2,4,6,8")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--samples", type=int, default=7)
    p.add_argument("--max-new-tokens", type=int, default=256, help="sizes the cache, as a run would")
    p.add_argument("--warm-rounds", type=int, default=40, help="rounds decoded before timing (context)")
    args = p.parse_args()

    model = load_model(args.model)
    head_cfg, head_params = load_head_dir(default_head_path(args.model))
    check_head_fits(head_cfg, model.config)
    depth = head_cfg.block_size - 1
    tree_cfg = TreeConfig(args.budget, args.width, depth, lookup=args.lookup)
    config = DecodeConfig(model.config, head_cfg, tree_cfg)
    ar_config = DecodeConfig(model.config)
    loaded = {"target": model.params, "head": head_params}
    params = prepare_params(loaded, config)  # as Runner does
    if head_cfg.draft_vocab_size is not None:  # the weights as loaded, the draft table unpacked too
        loaded["draft_table"] = draft_table(loaded, config)
    prompt = model.tokenizer.encode(PROMPT)
    state = start(params, [prompt], config, max_new_tokens=args.max_new_tokens)
    state = decode(params, state, jnp.int32(args.warm_rounds), config=config)
    print(f"{machine()['cpu']}, {args.model}, context {int(state.target_cache.lengths[0])} tokens, "
          f"cache capacity {state.target_cache.capacity}; ms per repetition, median of {args.samples} loops of {args.iters}")
    iters = args.iters

    def loop(body):
        """jit(params, *carry) running body(params, *carry) iters times (params stay arguments:
        closed-over weights would be constants that XLA folds)."""
        return jax.jit(lambda prm, *a: jax.lax.fori_loop(0, iters, lambda i, c: body(prm, *c), a))

    cases = {}

    def add_case(name, fn, *a, prm=None):
        cases[name] = (fn, (params if prm is None else prm, *a))

    def rewind(s):
        """The state after a round, moved back to where `state` stood (same context every repetition)."""
        head_cache = None if s.head_cache is None else s.head_cache.replace(lengths=state.head_cache.lengths)
        return s.replace(target_cache=s.target_cache.replace(lengths=state.target_cache.lengths),
                         head_cache=head_cache, num_new=state.num_new, done=state.done, rounds=state.rounds)

    ar_state = state.replace(head_cache=None)

    def ar_body(prm, s, cfg=ar_config):
        return (rewind(speculative_step({"target": prm["target"]}, s, cfg)[0]),)

    def spec_body(prm, s, cfg=config):
        return (rewind(speculative_step(prm, s, cfg)[0]),)

    # The same rounds with XLA's attention instead of the CPU kernel (kernels/tree_attn/cpu.py).
    xla_config = DecodeConfig(config.target.replace(attention_impl="xla"),
                              config.head.replace(attention_impl="xla"), config.tree)
    xla_ar = functools.partial(ar_body, cfg=DecodeConfig(config.target.replace(attention_impl="xla")))
    add_case("AR step (fused)", loop(ar_body), ar_state)
    add_case(f"round N={args.budget} lookup={args.lookup}", loop(spec_body), state)
    add_case("AR step, weights as loaded", loop(ar_body), ar_state, prm=loaded)
    add_case("round, weights as loaded", loop(spec_body), state, prm=loaded)
    add_case("AR step, XLA attention", loop(xla_ar), ar_state)
    add_case("round, XLA attention", loop(functools.partial(spec_body, cfg=xla_config)), state)

    for n in map(int, args.rows.split(",")):
        for with_logits in (True, False):
            def fwd(prm, cache, acc, n=n, with_logits=with_logits):
                tree = chain_tree(state.root, n)
                logits, _, cache = Transformer(config.target).apply(
                    {"params": prm["target"]}, tree.tokens, cache.lengths[:, None] + tree.depths, cache,
                    tree.mask, taps=config.taps if n > 1 else (), with_logits=with_logits)
                x = jnp.sum(jnp.argmax(logits, -1)) if with_logits else 0
                return cache, acc + x
            add_case(f"target N={n}{'' if with_logits else ' no LM head'}", loop(fwd), state.target_cache, jnp.int32(0))

    def draft_body(prm, hc, acc):
        logits, hc = draft_logits(prm, state.root, hc, config)
        return hc, acc + jnp.argmax(logits[:, 0, :], -1)[0]
    add_case("draft (head forward + logits)", loop(draft_body), state.head_cache, jnp.int32(0))

    logits, _ = draft_logits(params, state.root, state.head_cache, config)

    def tree_body(prm, s, lg, acc):
        tree = tree_from_logits(prm, s, lg, config)
        acc = acc + jnp.sum(tree.tokens)
        return s, lg + (acc % 2).astype(lg.dtype) * 1e-30, acc  # a carried change: nothing is hoisted
    add_case("tree build", loop(tree_body), state, logits, jnp.zeros((1,), jnp.int32))

    tree = tree_from_logits(params, state, logits, config)
    vlogits, features, vcache = verify(params, state.target_cache, tree, config)

    def commit_body(prm, s, tree, vlogits, features):
        return rewind(commit(prm, s, tree, vlogits, features, config)[0]), tree, vlogits, features
    add_case("accept + commit", loop(commit_body), state.replace(target_cache=vcache), tree, vlogits, features)

    # The prompt's prefill (target and head context, its bucket of rows): past 16 rows the packed
    # products are XLA's dot on the packed array, which re-lays it out.
    pre = prefill_inputs([prompt], config, max_new_tokens=args.max_new_tokens)
    tokens, *rest = pre.arrays

    def prefill_body(prm, acc):
        first = prefill(prm, jnp.where(acc < 0, 0, tokens), *rest, config=config, capacity=pre.capacity)
        used = jnp.sum(first.target_cache.k[-1]) + jnp.sum(first.head_cache.k[-1])  # the whole prefill is live
        return (acc + (used > 0).astype(jnp.int32),)  # acc is never negative, but XLA cannot know
    label = f"prefill, {len(prompt)} tokens ({tokens.shape[1]}-row bucket)"
    add_case(label, loop(prefill_body), jnp.int32(0))
    add_case(f"{label}, weights as loaded", loop(prefill_body), jnp.int32(0), prm=loaded)

    results = {k: v / iters * 1e3 for k, v in timed_round_robin(cases, args.samples).items()}
    ar = results["AR step (fused)"]
    print(f"{'stage':40s} {'ms':>7s} {'x AR':>5s}")
    for k, v in results.items():
        print(f"{k:40s} {v:7.2f} {v / ar:5.2f}")


if __name__ == "__main__":
    main()
