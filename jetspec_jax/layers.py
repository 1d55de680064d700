"""Building blocks shared by the target decoder and the draft head (Flax linen, used purely)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jetspec_jax.cache import write_rows
from jetspec_jax.kernels import cpu_matmul, tree_attention
from jetspec_jax.moe import SparseMoE

PACKED = "kernel_packed"  # a Linear's weight in the CPU kernel's packed layout, in place of "kernel"
PACKABLE = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "fc", "lm_head")  # Linear modules' names


class Linear(nn.Module):
    """x (..., K) -> (..., *features): Flax's Dense / DenseGeneral over the last axis (same params,
    `kernel` (K, *features) and `bias`, same initialisation), its product through
    `kernels.cpu_matmul`: on CPU a few rows stream the weight once (decoding, a tree's
    verification); elsewhere XLA's dot.

    When the params hold `kernel_packed` instead (`pack_linears`, once per loaded model for CPU
    decoding), the product reads that layout, which the CPU kernel streams fastest.
    """

    features: int | tuple[int, ...]
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        k, n = x.shape[-1], math.prod(features)
        x = x.astype(self.dtype)
        if self.has_variable("params", PACKED):
            y = cpu_matmul.matmul(x, self.get_variable("params", PACKED), "packed")
        else:
            init = nn.initializers.lecun_normal()  # on the (K, N) matrix, as DenseGeneral does
            kernel = self.param("kernel", lambda key, shape, dtype: init(key, (k, n), dtype).reshape(shape),
                                (k, *features), self.dtype)
            y = cpu_matmul.matmul(x, kernel.reshape(k, n))
        y = y.reshape(*x.shape[:-1], *features)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, features, self.dtype)
        return y


def pack_linears(params):
    """params with every `Linear` named in PACKABLE holding `kernel_packed` (the CPU kernel's
    packed layout) instead of `kernel`, where the CPU kernel is active for it (float32, CPU, one
    device) and the layout tiles it; the rest unchanged. Outputs are the same (the packed product
    sums in the same order; the layout is only faster to read: scripts/profile_round.py). Build it
    once per loaded model, outside any jitted step, and only for running: training and saving read
    `kernel`."""
    def walk(tree, name=None):
        if not isinstance(tree, dict):
            return tree
        if name in PACKABLE and "kernel" in tree:
            kernel = tree["kernel"]
            k, n = kernel.shape[0], math.prod(kernel.shape[1:])
            if cpu_matmul.packable(k, n) and cpu_matmul.active(kernel.dtype):
                rest = {key: value for key, value in tree.items() if key != "kernel"}
                return {**rest, PACKED: cpu_matmul.pack(kernel.reshape(k, n))}
        return {key: walk(value, key) for key, value in tree.items()}
    return walk(params)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in float32 as HF does, weight applied after the cast."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale * x32.astype(self.dtype)).astype(self.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
    """positions (B, T) int32 -> cos, sin (B, T, head_dim) float32 (HF "rotate_half" layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, H, Dh); cos, sin (B, T, Dh) -> rotated x (HF non-interleaved halves)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def attention_implementation(name: str):
    """Config value -> (implementation, interpret) for `tree_attention`.

    "auto" | "xla" | "pallas" as the kernel API; "pallas_interpret" runs the Pallas kernel in
    interpret mode (CPU tests of the kernel inside the whole model).
    """
    if name == "pallas_interpret":
        return "pallas", True
    return name, False


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up in one kernel (layout.py)."""

    intermediate_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        gate_up = Linear((2, self.intermediate_size), dtype=self.dtype, name="gate_up_proj")(x)  # (..., 2, F)
        h = nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
        return Linear(x.shape[-1], dtype=self.dtype, name="down_proj")(h)


class Attention(nn.Module):
    """Grouped-query attention over an explicit per-layer KV cache.

    Keys/values may come from a separate source (`kv_input`, the draft head's context) — the
    target passes none and attends over its own tokens.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: bool
    qkv_bias: bool
    rms_norm_eps: float
    attention_impl: str
    hidden_size: int
    dtype: jnp.dtype = jnp.float32
    o_bias: bool = False  # bias on o_proj (HF Qwen3 / DFlash with attention_bias; Qwen2 has none)

    def setup(self):
        group = self.num_heads // self.num_kv_heads
        # One kernel for q, k and v: per KV head, its query heads, then its key and value (layout.py).
        self.qkv_proj = Linear((self.num_kv_heads, group + 2, self.head_dim), use_bias=self.qkv_bias,
                               dtype=self.dtype, name="qkv_proj")
        self.o_proj = Linear(self.hidden_size, use_bias=self.o_bias, dtype=self.dtype, name="o_proj")
        if self.qk_norm:
            self.q_norm = RMSNorm(self.rms_norm_eps, self.dtype, name="q_norm")
            self.k_norm = RMSNorm(self.rms_norm_eps, self.dtype, name="k_norm")

    def projections(self, x, cos, sin):
        """x (B, T, d) -> q (B, T, H, Dh), k, v (B, T, Hkv, Dh); q and k normed and rotated."""
        b, t, _ = x.shape
        group = self.num_heads // self.num_kv_heads
        qkv = self.qkv_proj(x)  # (B, T, Hkv, G + 2, Dh)
        q = qkv[..., :group, :].reshape(b, t, self.num_heads, self.head_dim)
        k, v = qkv[..., group, :], qkv[..., group + 1, :]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def keys_values(self, x, cos, sin):
        """x (B, T, d) -> k, v (B, T, Hkv, Dh), k normed and rotated (the head's context rows;
        their queries are computed by the same product and dropped)."""
        _, k, v = self.projections(x, cos, sin)
        return k, v

    def __call__(self, x, cos, sin, cache_k, cache_v, lengths, tree_mask):
        """x (B, T, d); cos/sin (B, T, Dh); cache_k/v (B, Hkv, S, Dh); lengths (B,);
        tree_mask (B, T, T) -> out (B, T, d), new cache_k, new cache_v (rows written at lengths).
        """
        b, t, _ = x.shape
        q, k, v = self.projections(x, cos, sin)
        cache_k = write_rows(cache_k, k, lengths)
        cache_v = write_rows(cache_v, v, lengths)
        impl, interpret = attention_implementation(self.attention_impl)
        out = tree_attention(q, cache_k, cache_v, lengths, tree_mask, implementation=impl, interpret=interpret)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache_k, cache_v


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer (Llama / Qwen2 / Qwen3 / Qwen3-MoE).

    sparse: the feed-forward is the top-k routed MoE block (moe.py, Qwen3-MoE's sparse layers;
    `ModelConfig.is_sparse_layer`) instead of the dense MLP.
    """

    config: object  # ModelConfig (or the head's config with the same fields)
    sparse: bool = False

    def setup(self):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        self.input_norm = RMSNorm(c.rms_norm_eps, dtype, name="input_norm")
        self.post_attn_norm = RMSNorm(c.rms_norm_eps, dtype, name="post_attn_norm")
        self.attn = Attention(
            num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
            qk_norm=c.qk_norm, qkv_bias=c.qkv_bias, rms_norm_eps=c.rms_norm_eps,
            attention_impl=c.attention_impl, hidden_size=c.hidden_size, dtype=dtype,
            o_bias=getattr(c, "o_bias", False), name="attn",
        )
        if self.sparse:
            self.mlp = SparseMoE(c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.norm_topk_prob,
                                 dtype, name="mlp")
        else:
            self.mlp = MLP(c.intermediate_size, dtype, name="mlp")

    def __call__(self, x, cos, sin, cache_k, cache_v, lengths, tree_mask):
        h, cache_k, cache_v = self.attn(self.input_norm(x), cos, sin, cache_k, cache_v, lengths, tree_mask)
        x = x + h
        x = x + self.mlp(self.post_attn_norm(x))
        return x, cache_k, cache_v
