"""The CPU tree-attention kernel (kernels/cpu_matmul/attention.py via kernels/tree_attn/cpu.py)
against the plain-jnp reference at float32 "highest" precision: unused cache slots hold NaN, so a
read past lengths + N shows up; a query row's bits do not depend on the other rows of the call;
XLA serves what the kernel does not take (and gradients, CUDA lowerings)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetspec_jax.kernels import cpu_matmul
from jetspec_jax.kernels.tree_attn import tree_attention
from jetspec_jax.kernels.tree_attn.cpu import cpu_kernel_fits, tree_attention_cpu
from jetspec_jax.kernels.tree_attn.xla import tree_attention_xla
from tests.test_tree_attention import assert_matches, make_inputs, reference

pytestmark = pytest.mark.skipif(not cpu_matmul.enabled(), reason="the CPU kernels cannot run on this machine")


def _uses_kernel(fn, *args) -> bool:
    return cpu_matmul.ATTENTION_TARGET in jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("head_dim", cpu_matmul.HEAD_DIMS)
@pytest.mark.parametrize("lengths", [(0,), (37,), (0, 130, 5)])
@pytest.mark.parametrize("n, group", [(1, 3), (4, 3), (7, 1), (16, 4)])
def test_matches_reference(head_dim, lengths, n, group):
    args = make_inputs(np.random.default_rng(n + head_dim + sum(lengths)), n=n, num_heads=2 * group,
                       num_kv_heads=2, head_dim=head_dim, lengths=lengths, slack=9, dtype=jnp.float32)
    assert _uses_kernel(tree_attention_cpu, *args)
    out = jax.jit(tree_attention_cpu)(*args)
    assert np.isfinite(np.asarray(out)).all()  # no NaN slot (>= lengths + N) was read
    assert_matches(out, reference(*args))


def test_a_row_gets_the_same_bits_whatever_else_is_in_the_call():
    """The root of a 6-node tree sees the prefix and itself, as a one-row (AR) call with the same
    cache does: same result bit for bit. Likewise a node whose visible set is the same in two trees."""
    n = 6
    q, k, v, lens, _ = make_inputs(np.random.default_rng(3), n=n, num_heads=9, num_kv_heads=3, head_dim=64,
                                   lengths=(50,), slack=4, dtype=jnp.float32)
    chain = jnp.tril(jnp.ones((1, n, n), bool))
    star = jnp.eye(n, dtype=bool)[None].at[:, :, 0].set(True)  # every node a child of the root
    fn = jax.jit(tree_attention_cpu)
    one = fn(q[:, :1], k, v, lens, chain[:, :1, :1])
    in_chain, in_star = fn(q, k, v, lens, chain), fn(q, k, v, lens, star)
    np.testing.assert_array_equal(np.asarray(in_chain[:, 0]), np.asarray(one[:, 0]))
    np.testing.assert_array_equal(np.asarray(in_chain[:, 1]), np.asarray(in_star[:, 1]))  # both see {0, 1}


@pytest.mark.parametrize("case", ["prefill chunk", "bfloat16", "head_dim 80"])
def test_xla_serves_what_the_kernel_does_not_take(case):
    n, head_dim, dtype = 4, 64, jnp.float32
    if case == "prefill chunk":
        n = cpu_matmul.MAX_QUERIES + 1
    elif case == "bfloat16":
        dtype = jnp.bfloat16
    else:
        head_dim = 80
    args = make_inputs(np.random.default_rng(0), n=n, num_heads=4, num_kv_heads=2, head_dim=head_dim,
                       lengths=(20,), slack=3, dtype=dtype)
    assert not cpu_kernel_fits(*args) and not _uses_kernel(tree_attention_cpu, *args)
    assert_matches(jax.jit(tree_attention_cpu)(*args), reference(*args))


def test_the_auto_entry_point_uses_it_on_cpu_only():
    args = make_inputs(np.random.default_rng(1), n=4, num_heads=9, num_kv_heads=3, head_dim=64,
                       lengths=(10,), slack=2, dtype=jnp.float32)
    assert _uses_kernel(tree_attention, *args)
    assert not _uses_kernel(lambda *a: tree_attention(*a, implementation="xla"), *args)
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    cuda = jax.jit(tree_attention).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert cpu_matmul.ATTENTION_TARGET not in cuda


def test_gradients_are_xla_s_and_vmap_runs_row_by_row():
    q, k, v, lens, masks = make_inputs(np.random.default_rng(2), n=3, num_heads=4, num_kv_heads=2, head_dim=16,
                                       lengths=(6, 9), slack=0, dtype=jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, lens, masks) ** 2)

    got = jax.grad(loss(tree_attention_cpu), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(tree_attention_xla), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.nan_to_num(np.asarray(g)), np.nan_to_num(np.asarray(w)), rtol=1e-4, atol=1e-5)
    batched = jax.vmap(lambda *a: tree_attention_cpu(*(x[None] for x in a))[0])(q, k, v, lens, masks)
    assert_matches(batched, reference(q, k, v, lens, masks))
