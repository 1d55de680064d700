"""Tree attention on CPU through the LLVM kernel of `kernels/cpu_matmul/attention.py`.

XLA:CPU spends most of a decoding layer's attention time dispatching a dozen tiny ops; the kernel
does the whole attention of a few query rows in one call. It serves float32 inputs with at most
`MAX_QUERIES` query rows (decoding, a tree's verification, the draft head's block) and a head
dimension in `HEAD_DIMS`, on a CPU backend with one device and the kernel enabled; anything else
(a prefill chunk, bf16, GPU lowerings, sharded programs) and gradients (a custom VJP) use
`tree_attention_xla`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jetspec_jax.kernels import cpu_matmul
from jetspec_jax.kernels.tree_attn.xla import tree_attention_xla


def cpu_kernel_fits(q, k, v, lengths, tree_mask) -> bool:
    """The kernel serves these inputs in this process (a static decision, made while tracing)."""
    return (q.shape[1] <= cpu_matmul.MAX_QUERIES and q.shape[3] in cpu_matmul.HEAD_DIMS
            and q.shape[2] % k.shape[1] == 0 and k.shape == v.shape
            and cpu_matmul.active(q.dtype, k.dtype, v.dtype))


def _kernel(q, k, v, lengths, tree_mask):
    scale = jnp.asarray(q.shape[-1] ** -0.5, jnp.float32)  # as tree_attention_xla rounds it
    call = jax.ffi.ffi_call(cpu_matmul.ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            vmap_method="sequential")
    return call(q, k, v, lengths.astype(jnp.int32), tree_mask.astype(bool), scale)


@jax.custom_vjp
def _attention(q, k, v, lengths, tree_mask):
    return jax.lax.platform_dependent(q, k, v, lengths, tree_mask, cpu=_kernel, default=tree_attention_xla)


def _attention_fwd(q, k, v, lengths, tree_mask):
    return _attention(q, k, v, lengths, tree_mask), (q, k, v, lengths, tree_mask)


def _attention_bwd(residuals, g):
    q, k, v, lengths, tree_mask = residuals
    _, vjp = jax.vjp(lambda q, k, v: tree_attention_xla(q, k, v, lengths, tree_mask), q, k, v)
    return (*vjp(g), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def tree_attention_cpu(q, k, v, lengths, tree_mask):
    """`tree_attention_xla`'s contract and result (up to float32 rounding), by the kernel where
    `cpu_kernel_fits`, else by `tree_attention_xla` itself."""
    if cpu_kernel_fits(q, k, v, lengths, tree_mask):
        return _attention(q, k, v, lengths, tree_mask)
    return tree_attention_xla(q, k, v, lengths, tree_mask)
