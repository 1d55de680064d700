"""Static shapes: after warm-up, new prompts, lengths, seeds and temperatures compile nothing."""

import contextlib

import jax
import pytest

from jetspec_jax.config import ModelConfig
from jetspec_jax.decode import generate
from jetspec_jax.head import HeadConfig, init_head_params
from jetspec_jax.model import init_params
from jetspec_jax.step import DecodeConfig
from jetspec_jax.tree import TreeConfig

TARGET = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, intermediate_size=64)
HEAD = HeadConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=64, vocab_size=64, num_target_layers=2, mask_token_id=63,
                  block_size=4, target_layer_ids=(0,))

_compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _secs, **_: _compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)


@contextlib.contextmanager
def count_compiles():
    before = len(_compiles)
    counter = {}
    yield counter
    counter["n"] = len(_compiles) - before


@pytest.mark.parametrize("mode", ["ar", "tree"])
def test_no_compilation_after_warm_up(mode):
    params = {"target": init_params(TARGET, jax.random.PRNGKey(0))}
    config = DecodeConfig(target=TARGET, sample=True)
    if mode == "tree":
        params["head"] = init_head_params(HEAD, jax.random.PRNGKey(1))
        config = DecodeConfig(target=TARGET, head=HEAD, tree=TreeConfig(6, 2, 3), sample=True)
    run = lambda prompts, **kw: generate(params, prompts, config, **kw)  # noqa: E731
    run([[1, 2, 3], [4, 5]], max_new_tokens=20, temperature=0.0, seed=0)  # warm-up
    with count_compiles() as c:
        # Same bucket (prompts <= 16 tokens, capacity step), other lengths, values, seeds, limits.
        run([[7] * 16, [9]], max_new_tokens=12, temperature=0.7, top_k=5, top_p=0.9, seed=3)
        run([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3]], max_new_tokens=30, temperature=[0.0, 1.3], seed=[1, 2],
            stop_ids=[4, 8])
    assert c["n"] == 0
    # The counter works: a new batch size is a new shape and compiles.
    with count_compiles() as c:
        run([[1, 2, 3]], max_new_tokens=20)
    assert c["n"] > 0


def test_runner_warm_up_compiles_without_computing_and_is_keyed_on_the_program():
    """`Runner._warm_up` compiles prefill and the loop ahead of time (no prefill is run: the model
    is never called on the prompts) for the shapes that decide the program, and `run` runs those
    programs: its first run compiles nothing more; a prompt of another length in the same bucket,
    or another max-new-tokens within the same cache capacity, is not warmed up again."""
    from jetspec_jax import decode as decoding
    from jetspec_jax.runner import Runner

    params = {"target": init_params(TARGET, jax.random.PRNGKey(0)),
              "head": init_head_params(HEAD, jax.random.PRNGKey(1))}
    config = DecodeConfig(target=TARGET, head=HEAD, tree=TreeConfig(6, 2, 3))
    runner = Runner(params, config)
    calls = []
    real_prefill = decoding.prefill
    try:
        decoding.prefill = _Spy(real_prefill, calls)
        with count_compiles() as c:
            runner._warm_up([[1, 2, 3]], dict(max_new_tokens=20))
        assert c["n"] >= 2 and runner.compile_seconds > 0  # prefill and the loop
        assert calls == []  # compiled, never run
    finally:
        decoding.prefill = real_prefill
    with count_compiles() as c:
        first = runner.run([[1, 2, 3]], max_new_tokens=20)[0]  # runs the programs of the warm-up
    assert c["n"] == 0
    assert first.ids == generate(params, [[1, 2, 3]], config, max_new_tokens=20)[0].ids
    seconds = runner.compile_seconds
    with count_compiles() as c:
        runner.run([[5] * 11], max_new_tokens=24)  # bucket 16, same capacity
    assert c["n"] == 0 and runner.compile_seconds == seconds
    with count_compiles() as c:
        runner.run([[5] * 17], max_new_tokens=24)  # bucket 32: a new program, compiled in the warm-up
    assert c["n"] > 0 and runner.compile_seconds > seconds


class _Spy:
    """Stands in for the jitted `prefill`: records calls on concrete arrays (a run, not a trace
    inside the ahead-of-time compilation), forwards `.lower` to the real one."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __call__(self, *args, **kwargs):
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
            self.calls.append(1)
        return self.fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.fn.lower(*args, **kwargs)
