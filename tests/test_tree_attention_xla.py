"""The XLA tree attention (`tree_attention_xla`, the CPU path) equals the plain-jnp reference.

It attends over a window of the cache chosen at run time among static sizes (the short ones, or
the whole cache), and every slot at >= lengths + N holds NaN: a read of an unused slot that reaches
the result shows up as a NaN. Unused slots holding finite values take a faster path (no masked
copy of V), checked to give the same bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetspec_jax.kernels.tree_attn import tree_attention, tree_attention_reference
from jetspec_jax.kernels.tree_attn.xla import tree_attention_xla, window_sizes
from tests.test_tree_attention import assert_matches, make_inputs

SLACK = 300  # unused slots past the longest row: S = max(lengths) + N + SLACK


def reference(*args):
    with jax.default_matmul_precision("highest"):
        return tree_attention_reference(*args)


def test_window_sizes():
    # Powers of two from 128 that can hold the N new rows and are at most half the capacity (a
    # longer window's copy costs more than reading the whole cache), then the capacity itself.
    assert window_sizes(1, 1024) == (128, 256, 512, 1024)
    assert window_sizes(1, 1000) == (128, 256, 1000)
    assert window_sizes(200, 1000) == (256, 1000)
    assert window_sizes(64, 100) == (100,)


@pytest.mark.parametrize("lengths", [(0,), (300,), (0, 130, 700)])
def test_finite_unused_slots_give_the_masked_result_bit_for_bit(lengths):
    q, k, v, lens, masks = make_inputs(np.random.default_rng(7), n=16, num_heads=6, num_kv_heads=2,
                                       head_dim=32, lengths=lengths, slack=SLACK, dtype=jnp.float32)
    unused = jnp.isnan(v)
    finite = (q, jnp.where(unused, 1e30, k), jnp.where(unused, -1e30, v), lens, masks)
    fast, masked = jax.jit(tree_attention_xla)(*finite), jax.jit(tree_attention_xla)(q, k, v, lens, masks)
    assert np.isfinite(np.asarray(fast)).all()
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(masked))


@pytest.mark.parametrize("lengths", [(0,), (127,), (128,), (300,), (0, 130, 700), (5, 5)])
@pytest.mark.parametrize("n, group", [(1, 3), (1, 8), (16, 2), (64, 4)])
def test_matches_reference(lengths, n, group):
    args = make_inputs(np.random.default_rng(n + sum(lengths)), n=n, num_heads=2 * group, num_kv_heads=2,
                       head_dim=32, lengths=lengths, slack=SLACK, dtype=jnp.float32)
    assert_matches(jax.jit(tree_attention_xla)(*args), reference(*args))


def test_causal_prefill():
    # Prefill: N = the prompt bucket, empty prefix, causal mask; wider than the smallest windows.
    n = 256
    causal = np.tril(np.ones((n, n), bool))[None]
    args = make_inputs(np.random.default_rng(1), n=n, num_heads=9, num_kv_heads=3, head_dim=64,
                       lengths=(0,), slack=SLACK, dtype=jnp.float32, tree_masks=causal)
    assert_matches(tree_attention_xla(*args), reference(*args))


def test_bfloat16():
    args = make_inputs(np.random.default_rng(2), n=16, num_heads=4, num_kv_heads=2, head_dim=32,
                       lengths=(200,), slack=SLACK, dtype=jnp.bfloat16)
    assert_matches(tree_attention_xla(*args), reference(*args))


def test_api_xla_is_this_path():
    args = make_inputs(np.random.default_rng(3), n=4, num_heads=4, num_kv_heads=1, head_dim=16,
                       lengths=(150,), slack=SLACK, dtype=jnp.float32)
    np.testing.assert_array_equal(tree_attention(*args, implementation="xla"), tree_attention_xla(*args))
