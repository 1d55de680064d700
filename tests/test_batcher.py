"""Continuous batching: every prompt's result equals generating it alone, whatever row it ran in,
whoever shared the batch, and however often that row was refilled."""

import jax
import numpy as np
import pytest

from jetspec_jax.batcher import generate_continuous
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
                  block_size=4, target_layer_ids=(0, 1))
STOP = (3, 17, 40)  # frequent enough under sampling that answer lengths differ widely


@pytest.fixture(scope="module")
def params():
    return {"target": init_params(TARGET, jax.random.PRNGKey(0)),
            "head": init_head_params(HEAD, jax.random.PRNGKey(1))}


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 63, size=int(rng.integers(1, 30))).tolist() for _ in range(n)]


@pytest.mark.parametrize("temperature,tree", [
    (1.0, None),
    (0.0, None),
    (1.0, TreeConfig(budget=6, width=2, depth=3)),
])
def test_each_result_equals_generating_that_prompt_alone(params, temperature, tree):
    config = DecodeConfig(target=TARGET, head=HEAD if tree else None, tree=tree, sample=temperature > 0)
    prompts, seeds = _prompts(11), [100 + i for i in range(11)]
    got = dict(generate_continuous(params, prompts, config, batch_size=4, refill_size=2, max_new_tokens=20,
                                   temperature=temperature, seeds=seeds, stop_ids=STOP, chunk_rounds=3))
    assert sorted(got) == list(range(11))
    lengths = set()
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = generate(params, [prompt], config, max_new_tokens=20, temperature=temperature, seed=seed,
                         stop_ids=STOP)[0]
        assert got[i].ids == alone.ids, i
        assert got[i].stopped == alone.stopped
        lengths.add(len(alone.ids))
    if temperature > 0:
        assert len(lengths) > 3  # rows really finished at different times, so refills happened mid-run


def test_fewer_prompts_than_rows(params):
    config = DecodeConfig(target=TARGET)
    prompts = _prompts(2, seed=1)
    got = dict(generate_continuous(params, prompts, config, batch_size=8, max_new_tokens=5))
    assert [got[i].ids for i in range(2)] == [g.ids for g in generate(params, prompts, config, max_new_tokens=5)]



def _host(x):
    return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


@pytest.mark.parametrize("batch,num_rows", [(6, 3), (80, 70)])  # in-place updates; scatter past 64
def test_replace_rows_puts_each_new_row_where_asked(params, batch, num_rows):
    from jetspec_jax.batcher import replace_rows
    from jetspec_jax.decode import start
    from jetspec_jax.step import map_rows

    config = DecodeConfig(target=TARGET)
    old = start(params, _prompts(batch, seed=1), config, max_new_tokens=4, capacity=256)
    new = start(params, _prompts(num_rows, seed=2), config, max_new_tokens=5, capacity=256)
    rows = np.random.default_rng(0).permutation(batch)[:num_rows]
    got = jax.jit(replace_rows)(old, new, rows)

    def check(g, o, n):  # every per-row leaf: row rows[j] is new row j, the others are unchanged
        want = _host(o).copy()
        want[rows] = _host(n)
        np.testing.assert_array_equal(_host(g), want)
        return g

    map_rows(check, got, old, new)
    np.testing.assert_array_equal(got.sampling.stop_ids, old.sampling.stop_ids)
