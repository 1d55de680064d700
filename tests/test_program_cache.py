"""program_cache: a second compile of the same program reads its lowered form instead of tracing,
gives the same results, and never serves a program to a different key, shape or source."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetspec_jax import program_cache


@pytest.fixture
def cache(tmp_path):
    program_cache.enable(tmp_path / "programs")
    yield tmp_path / "programs"
    program_cache.disable()


TRACES = []


def _step(params, state, scale):
    TRACES.append(1)  # runs once per trace, never when a compiled program runs
    h = jnp.tanh(state["x"] @ params["w"]) * scale
    return {"x": h, "n": state["n"] + 1}, h.sum()


def _args(n=4):
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)}
    state = {"x": jnp.ones((2, n), jnp.float32), "n": jnp.int32(0)}
    return params, state


def _compile(scale=2.0, n=4, donate=(1,)):
    jitted = jax.jit(functools.partial(_step, scale=scale), donate_argnums=donate)
    return program_cache.compile("step", jitted, _args(n), key=(scale,), donate=donate)


def test_second_compile_does_not_trace_and_agrees(cache):
    TRACES.clear()
    first = _compile()
    assert len(TRACES) == 1 and len(list(cache.glob("step-*.bin"))) == 1
    jax.clear_caches()
    again = _compile()
    assert len(TRACES) == 1  # read from the entry: no trace
    reference = jax.jit(functools.partial(_step, scale=2.0))(*_args())
    assert len(TRACES) == 2
    for program in (first, again):
        params, state = _args()
        out = program(params, state)
        assert jax.tree.structure(out) == jax.tree.structure(reference)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), out, reference)
        assert state["x"].is_deleted()  # donated, as jit's donate_argnums would
        assert not params["w"].is_deleted()
    assert jax.tree.map(lambda s: (s.shape, s.dtype), again.out_info) == jax.tree.map(
        lambda s: (s.shape, s.dtype), jax.eval_shape(functools.partial(_step, scale=2.0), *_args()))


def test_key_shape_and_source_pick_their_own_entries(cache, monkeypatch):
    _compile()
    _compile(scale=3.0)  # another static value
    _compile(n=8)  # other shapes
    assert len(list(cache.glob("step-*.bin"))) == 3
    out = _compile(scale=3.0)(*_args())[1]
    np.testing.assert_allclose(float(out), float(jax.jit(functools.partial(_step, scale=3.0))(*_args())[1]), rtol=1e-6)
    monkeypatch.setattr(program_cache, "_SOURCE_DIGEST", "an edited checkout")
    TRACES.clear()
    _compile()
    assert TRACES and len(list(cache.glob("step-*.bin"))) == 4


def test_damaged_entry_is_compiled_again_and_replaced(cache):
    _compile()
    (entry,) = cache.glob("step-*.bin")
    entry.write_bytes(entry.read_bytes()[:100])
    TRACES.clear()
    jax.clear_caches()
    out = _compile()(*_args())[1]
    assert TRACES and entry.stat().st_size > 100
    assert float(out) == float(jax.jit(functools.partial(_step, scale=2.0))(*_args())[1])


def test_least_recently_used_entries_are_pruned(cache, monkeypatch):
    _compile(scale=1.0)
    (first,) = cache.glob("step-*.bin")
    monkeypatch.setattr(program_cache, "MAX_BYTES", int(2.5 * first.stat().st_size))  # room for two
    _compile(scale=2.0)
    os.utime(first, ns=(1, 1))  # scale 1.0 is now the least recently used
    second = set(cache.glob("step-*.bin")) - {first}
    _compile(scale=2.0)  # a read: refreshes its entry
    _compile(scale=3.0)  # a third entry: the oldest goes
    left = set(cache.glob("step-*.bin"))
    assert len(left) == 2 and first not in left and second <= left


def test_off_by_default_writes_nothing(tmp_path):
    program_cache.disable()
    TRACES.clear()
    out = _compile()(*_args())[1]
    assert TRACES and not list(tmp_path.rglob("*.bin")) and np.isfinite(float(out))


def test_decoding_programs_from_the_cache_equal_the_jitted_loop(cache, tiny_hf_models, monkeypatch):
    """compile_programs through the cache: the second call traces no speculative step, and greedy
    ids equal decode.generate's (the jitted functions, no cache)."""
    from jetspec_jax import decode as decode_module
    from jetspec_jax.head import HeadConfig, init_head_params
    from jetspec_jax.loading import load_model
    from jetspec_jax.step import DecodeConfig
    from jetspec_jax.tree import TreeConfig

    model = load_model(tiny_hf_models["qwen3"])
    t = model.config
    head = HeadConfig(hidden_size=t.hidden_size, num_layers=1, num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
                      head_dim=t.head_dim, intermediate_size=t.intermediate_size, vocab_size=t.vocab_size,
                      num_target_layers=t.num_layers, target_layer_ids=(0, 1), block_size=4, mask_token_id=1)
    config = DecodeConfig(target=t, head=head, tree=TreeConfig(kind="best_first", budget=4, width=2, depth=3))
    params = {"target": model.params, "head": init_head_params(head, jax.random.key(0))}
    prompts = [[3, 5, 7, 9], [11, 2]]
    want = [g.ids for g in decode_module.generate(params, prompts, config, max_new_tokens=12)]

    steps = []
    real = decode_module.speculative_step
    monkeypatch.setattr(decode_module, "speculative_step", lambda *a, **k: (steps.append(1), real(*a, **k))[1])
    inputs = decode_module.prefill_inputs(prompts, config, max_new_tokens=12)
    for expect_traces in (True, False):
        jax.clear_caches()
        steps.clear()
        programs = decode_module.compile_programs(params, inputs, config)
        assert bool(steps) == expect_traces
        state = programs.decode(params, programs.prefill(params, inputs), 1000)
        assert [g.ids for g in decode_module.results(state)] == want
