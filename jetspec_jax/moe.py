"""Sparse mixture-of-experts feed-forward (Qwen3-MoE), dispatched densely with static shapes.

Routing is exactly transformers' `Qwen3MoeSparseMoeBlock` (transformers 5.x `Qwen3MoeTopKRouter`):

    router_logits = x @ router                          (N, E), in the activation dtype
    probs = softmax(float32(router_logits))              over all E experts
    top_w, top_i = top_k(probs, k)                       (N, k)
    top_w /= sum(top_w)            only if norm_topk_prob
    out = sum_j top_w[j] * expert[top_i[j]](x)           each expert a SwiGLU of width F

Parameters (under the layer's `mlp`; kernels (in, out) as Flax, experts stacked on a leading axis):

    router/kernel          (d, E)        HF `mlp.gate.weight` (E, d), transposed
    experts/gate_up_proj   (E, d, 2, F)  HF `mlp.experts.{e}.gate_proj.weight` / `up_proj.weight`
                                         (F, d) each, transposed and stacked ([:, :, 0] gate, [:, :, 1] up)
    experts/down_proj      (E, F, d)     HF `mlp.experts.{e}.down_proj.weight` (d, F), transposed

gate and up share one kernel as in the dense MLP (layout.py splits it into `experts/gate_proj`
and `experts/up_proj`, (E, d, F) each, for checkpoints). Under tensor parallelism the F axis of
both kernels is split over tp (sharding.py): every device runs every expert on its slice of F and
the down projection's partial sums are reduced, as for the dense MLP; the router is replicated,
so every device picks the same experts.

Dense dispatch, and what it costs: every token runs through all E experts and the outputs are
combined with a (N, E) weight matrix that is zero outside each token's top-k. Shapes are static
and nothing depends on the routing (no sort by expert, no gather of weights, no data-dependent
capacity), so the block jits, shards and lowers for any backend unchanged. The price is E / k
times the FLOPs of a sparse dispatch (Qwen3-30B-A3B: 128 / 8 = 16x) and reading every expert's
weights each step. In decoding N is small (the tree's nodes, a few dozen), and a tree of N
tokens x k picks touches most of the E experts anyway (64 x 8 picks over 128 experts, routed uniformly,
leave about 2% of them unused), so the weight reads, which bound a decoding step, are about those of
a sparse dispatch; the extra FLOPs matter only where compute does: long prefills and large
batches. For tiny and medium models this is the right trade; a grouped (ragged) matmul by
expert would be the next step for large ones.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def route(router_logits: jax.Array, top_k: int, norm_topk_prob: bool) -> jax.Array:
    """router_logits (N, E) -> combine weights (N, E) float32: each row's top-k routing
    probabilities (renormalized to sum to 1 if `norm_topk_prob`) at their experts, 0 elsewhere.

    Worked example, E = 4, k = 2: probs [0.1, 0.5, 0.3, 0.1] -> [0, 0.5, 0.3, 0] without
    normalization, [0, 0.625, 0.375, 0] with it.
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    top_w, top_i = jax.lax.top_k(probs, top_k)  # (N, k)
    if norm_topk_prob:
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    one_hot = jax.nn.one_hot(top_i, router_logits.shape[-1], dtype=jnp.float32)  # (N, k, E)
    return jnp.einsum("nk,nke->ne", top_w, one_hot)


class Experts(nn.Module):
    """E SwiGLU experts with stacked kernels: x (N, d) -> every expert's output (N, E, d)."""

    num_experts: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d, e, f = x.shape[-1], self.num_experts, self.intermediate_size
        init = nn.initializers.lecun_normal
        gate_up = self.param("gate_up_proj", init(in_axis=1, out_axis=(2, 3), batch_axis=(0,)), (e, d, 2, f), self.dtype)
        down = self.param("down_proj", init(in_axis=1, out_axis=2, batch_axis=(0,)), (e, f, d), self.dtype)
        h = jnp.einsum("nd,edcf->necf", x, gate_up)  # (N, E, 2, F)
        h = nn.silu(h[:, :, 0]) * h[:, :, 1]  # (N, E, F)
        return jnp.einsum("nef,efd->ned", h, down)


class SparseMoE(nn.Module):
    """x (..., d) -> (..., d): top-k routed SwiGLU experts (see the module docstring)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # each expert's width F (HF `moe_intermediate_size`)
    norm_topk_prob: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        lead, d = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, d)  # (N, d)
        router_logits = nn.Dense(self.num_experts, use_bias=False, dtype=self.dtype, param_dtype=self.dtype,
                                 name="router")(x)
        # HF casts the routing weights to the activation dtype before combining.
        weights = route(router_logits, self.top_k, self.norm_topk_prob).astype(self.dtype)  # (N, E)
        out = Experts(self.num_experts, self.intermediate_size, self.dtype, name="experts")(x)  # (N, E, d)
        return jnp.einsum("ne,ned->nd", weights, out).reshape(*lead, d)
