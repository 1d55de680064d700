"""The tree-attention entry point: picks the implementation and, under a mesh, shards the kernel."""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from jetspec_jax.kernels.tree_attn.cpu import tree_attention_cpu
from jetspec_jax.kernels.tree_attn.pallas_kernel import pallas_supports, tree_attention_pallas
from jetspec_jax.kernels.tree_attn.xla import tree_attention_xla, tree_attention_xla_branch_free

IMPLEMENTATIONS = ("auto", "pallas", "xla")
# The mesh axes of jetspec_jax.sharding: batch rows on "dp", attention heads on "tp".
BATCH_AXIS, HEADS_AXIS = "dp", "tp"


def tree_attention(q, k, v, lengths, tree_mask, *, implementation: str = "auto", interpret: bool = False):
    """Attention of N new queries over a KV cache that already holds their own K/V.

    q (B, N, Hq, D); k, v (B, Hkv, S, D) with the N new rows at [lengths[b], lengths[b] + N);
    lengths (B,) int32; tree_mask (B, N, N) bool (ancestor-or-self) -> (B, N, Hq, D).

    implementation: "pallas", "xla", or "auto": the Pallas kernel in programs lowered for CUDA,
    the CPU kernel (`kernels/tree_attn/cpu.py`) where it fits on CPU, XLA elsewhere, decided per
    lowering platform (`lax.platform_dependent`), so a program lowered for CUDA on a CPU machine
    holds the kernel. "pallas" falls back to XLA only for inputs the
    kernel does not cover (it raises NotImplementedError, e.g. head_dim 80); every other error
    propagates. XLA on CUDA is the branch-free variant. `interpret` runs the Pallas kernel on CPU
    (tests).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown tree-attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
    args = (q, k, v, lengths, tree_mask)
    if implementation == "xla" or not pallas_supports(*args):
        return _xla(*args, cpu=tree_attention_cpu if implementation == "auto" else tree_attention_xla)
    if implementation == "pallas":
        return _per_shard(functools.partial(tree_attention_pallas, interpret=interpret), *args)
    # "auto": both branches are traced, only the lowering platform's is emitted; on CPU the LLVM
    # kernel where it fits (cpu.py), else XLA.
    return jax.lax.platform_dependent(*args, cuda=lambda *a: _per_shard(tree_attention_pallas, *a),
                                      rocm=tree_attention_xla_branch_free, default=tree_attention_cpu)


def _xla(*args, cpu=tree_attention_xla):
    return jax.lax.platform_dependent(*args, cuda=tree_attention_xla_branch_free, rocm=tree_attention_xla_branch_free,
                                      default=cpu)


def _per_shard(kernel, q, k, v, lengths, tree_mask):
    """Run `kernel` on each device's own rows and heads when a mesh is set (`jax.set_mesh`, or
    `jax.sharding.use_abstract_mesh` inside jit, as decode.py does).

    The Pallas call is opaque to XLA's partitioner: left alone under a mesh, every device would
    gather the global q/K/V around it. Under `shard_map` each device's Triton call sees its own
    batch rows (dp) and KV heads with their query heads (tp; query head h * G + g belongs to KV
    head h, so contiguous shards of both match). An axis that does not divide the array, or has
    size 1, is not split, as in jetspec_jax.sharding, which lays the caches out the same way.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, lengths, tree_mask)
    size = dict(zip(mesh.axis_names, mesh.axis_sizes))

    def axis(name, extent):
        return name if size.get(name, 1) > 1 and extent % size[name] == 0 else None

    rows, heads = axis(BATCH_AXIS, q.shape[0]), axis(HEADS_AXIS, k.shape[1])
    if rows is None and heads is None:
        return kernel(q, k, v, lengths, tree_mask)
    queries, cache = P(rows, None, heads, None), P(rows, heads, None, None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(queries, cache, cache, P(rows), P(rows, None, None)),
                         out_specs=queries, check_vma=False)(q, k, v, lengths, tree_mask)
