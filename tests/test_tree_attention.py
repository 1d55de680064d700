"""Tree attention: the Pallas kernel and the API equal the plain-jnp reference.

One set of cases runs twice: compiled with Triton on a GPU (`TestTreeAttentionGPU`, marked gpu,
real head sizes) and with `interpret=True` on CPU (`TestTreeAttentionInterpret`, small sizes and
a subset of the grid, because interpret mode is slow). Every cache slot at >= lengths + N holds
NaN, so any read of an unused slot that reaches the result shows up as a NaN.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetspec_jax.kernels.tree_attn import (
    BlockSizes,
    tree_attention,
    tree_attention_pallas,
    tree_attention_reference,
)

F32_MAX_ABS_ERR = 2e-5
HALF_REL_ERR = 1e-2  # bf16 / f16: max abs error relative to the largest output value


def pytest_generate_tests(metafunc):
    # Each test class lists its own cases: the full grid on GPU, a cheap covering subset on CPU.
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", metafunc.cls.CASES, ids=lambda c: f"n{c[0]}-g{c[1]}-{jnp.dtype(c[2]).name}")


def random_tree_mask(rng: np.random.Generator, n: int) -> np.ndarray:
    """Ancestor-or-self mask (N, N) bool of a random tree whose parents come before children.

    parent = [-1, 0, 0, 1] gives [[1,0,0,0], [1,1,0,0], [1,0,1,0], [1,1,0,1]].
    """
    parent = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
    mask = np.zeros((n, n), bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parent[j]
    return mask


def make_inputs(rng, *, n, num_heads, num_kv_heads, head_dim, lengths, slack, dtype, tree_masks=None):
    """Random q (B, N, Hq, D), cache k, v (B, Hkv, S, D) with NaN at every slot >= lengths + N,
    lengths (B,), and one random tree mask (B, N, N) per row unless given."""
    b = len(lengths)
    s = max(lengths) + n + slack
    if tree_masks is None:
        tree_masks = np.stack([random_tree_mask(rng, n) for _ in range(b)])
    q = rng.standard_normal((b, n, num_heads, head_dim))
    k = rng.standard_normal((b, num_kv_heads, s, head_dim))
    v = rng.standard_normal((b, num_kv_heads, s, head_dim))
    for row, length in enumerate(lengths):
        k[row, :, length + n :] = np.nan
        v[row, :, length + n :] = np.nan
    return (
        jnp.asarray(q, dtype),
        jnp.asarray(k, dtype),
        jnp.asarray(v, dtype),
        jnp.asarray(lengths, jnp.int32),
        jnp.asarray(tree_masks),
    )


def reference(*args):
    # XLA runs f32 dots on GPU tensor cores as TF32 by default; the reference must be exact f32.
    with jax.default_matmul_precision("highest"):
        return tree_attention_reference(*args)


def assert_matches(out, expected):
    out = np.asarray(out.astype(jnp.float32))
    expected_f32 = np.asarray(expected.astype(jnp.float32))
    assert out.shape == expected_f32.shape and np.isfinite(out).all()
    err = np.abs(out - expected_f32).max()
    if expected.dtype == jnp.float32:
        assert err <= F32_MAX_ABS_ERR, f"max abs error {err}"
    else:
        assert err <= HALF_REL_ERR * np.abs(expected_f32).max(), f"max abs error {err}"


class TreeAttentionCases:
    """The cases; subclasses choose where they run (INTERPRET) and at what sizes."""

    INTERPRET = False
    NUM_KV_HEADS = 2
    HEAD_DIM = 128
    LENGTHS = (0, 259, 1500)  # per batch row: the empty prefix, a partial block, many blocks
    SLACK = 37  # unused slots past the longest row; makes S a non-multiple of every block size
    # (N, query heads per KV head, dtype); group 3 is SmolLM2's 9/3 heads (rows not a power of 2).
    CASES = [
        *itertools.product((1, 16, 64, 128, 256), (1, 2, 4, 8), (jnp.float32, jnp.bfloat16)),
        (16, 3, jnp.float32),
        (64, 4, jnp.float16),
    ]
    BLOCK_SIZES = (
        BlockSizes(block_rows=16, block_k=16),
        BlockSizes(block_rows=32, block_k=128, kv_splits=4),
        BlockSizes(block_rows=128, block_k=32, kv_splits=3),
    )

    def inputs(self, n, group, dtype, *, seed=0, **kwargs):
        return make_inputs(
            np.random.default_rng(seed),
            n=n,
            num_heads=group * self.NUM_KV_HEADS,
            num_kv_heads=self.NUM_KV_HEADS,
            head_dim=kwargs.pop("head_dim", self.HEAD_DIM),
            lengths=self.LENGTHS,
            slack=self.SLACK,
            dtype=dtype,
            **kwargs,
        )

    def test_matches_reference(self, case):
        n, group, dtype = case
        args = self.inputs(n, group, dtype)
        assert_matches(tree_attention_pallas(*args, interpret=self.INTERPRET), reference(*args))

    @pytest.mark.parametrize("n", [16, 64])
    def test_causal_prefill(self, n):
        # Prefill is a chain: query i sees the prefix and nodes 0..i.
        causal = np.broadcast_to(np.tril(np.ones((n, n), bool)), (len(self.LENGTHS), n, n))
        args = self.inputs(n, 2, jnp.float32, tree_masks=causal)
        assert_matches(tree_attention_pallas(*args, interpret=self.INTERPRET), reference(*args))

    @pytest.mark.parametrize("block_sizes", range(3))
    def test_block_sizes_and_prefix_splits(self, block_sizes):
        args = self.inputs(64, 4, jnp.float32, seed=block_sizes)
        out = tree_attention_pallas(*args, block_sizes=self.BLOCK_SIZES[block_sizes], interpret=self.INTERPRET)
        assert_matches(out, reference(*args))

    def test_api_pallas_equals_xla(self):
        args = self.inputs(16, 4, jnp.float32)
        pallas = tree_attention(*args, implementation="pallas", interpret=self.INTERPRET)
        with jax.default_matmul_precision("highest"):
            xla = tree_attention(*args, implementation="xla")
        assert_matches(pallas, xla)

    def test_api_falls_back_to_xla_for_unsupported_head_dim(self):
        args = self.inputs(16, 2, jnp.float32, head_dim=24)
        with pytest.raises(NotImplementedError, match="head_dim 24"):
            tree_attention_pallas(*args, interpret=self.INTERPRET)
        out = tree_attention(*args, implementation="pallas", interpret=self.INTERPRET)
        assert_matches(out, reference(*args))

    def test_api_does_not_hide_contract_errors(self):
        q, k, v, lengths, tree_mask = self.inputs(16, 2, jnp.float32)
        # A mask for 8 of the 16 queries is a caller bug, not a reason to switch implementation.
        with pytest.raises(ValueError, match="tree_mask must be bool"):
            tree_attention(q, k, v, lengths, tree_mask[:, :8, :8], implementation="pallas", interpret=self.INTERPRET)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the kernel with Triton; needs a GPU")
class TestTreeAttentionGPU(TreeAttentionCases):
    pass


class TestTreeAttentionInterpret(TreeAttentionCases):
    INTERPRET = True
    NUM_KV_HEADS = 1
    HEAD_DIM = 16
    LENGTHS = (0, 7, 70)
    SLACK = 5
    # Every N and every group appears at least once; both half-precision dtypes once.
    CASES = [
        (1, 8, jnp.float32),
        (16, 1, jnp.float32),
        (16, 3, jnp.float32),
        (64, 2, jnp.bfloat16),
        (128, 4, jnp.float32),
        (256, 1, jnp.float32),
        (16, 4, jnp.float16),
    ]


def test_unknown_implementation_is_an_error():
    args = make_inputs(
        np.random.default_rng(0), n=1, num_heads=2, num_kv_heads=1, head_dim=16, lengths=(3,), slack=0, dtype=jnp.float32
    )
    with pytest.raises(ValueError, match="unknown tree-attention implementation 'triton'"):
        tree_attention(*args, implementation="triton")


def test_auto_runs_on_this_backend():
    # On CPU "auto" must pick XLA: a compiled (non-interpret) Pallas call cannot run here.
    args = make_inputs(
        np.random.default_rng(1), n=16, num_heads=4, num_kv_heads=2, head_dim=16, lengths=(0, 9), slack=3, dtype=jnp.float32
    )
    assert_matches(tree_attention(*args), reference(*args))
