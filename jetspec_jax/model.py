"""The target LLM: one decoder for Qwen3, Qwen3-MoE, Qwen2/2.5 and Llama/SmolLM2, used purely.

    logits, taps, cache = Transformer(cfg).apply({"params": p}, tokens, positions, cache, tree_mask)

One forward serves prefill (causal tree mask), AR decoding (N = 1), chain and tree verification
(ancestor mask): the T new tokens' K/V are written at `[cache.lengths, cache.lengths + T)` and
attend to the committed prefix plus the new tokens allowed by `tree_mask`. `cache.lengths` is not
advanced here; committing is the caller's decision.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jetspec_jax.cache import KVCache
from jetspec_jax.config import ModelConfig
from jetspec_jax.kernels import cpu_matmul
from jetspec_jax.kernels.cpu_matmul import matmul
from jetspec_jax.layers import PACKED, DecoderLayer, Linear, RMSNorm, pack_linears, rope_tables


LM_HEAD_PACKED = "lm_head_packed"  # optional target param: the tied embedding as a packed (d, V) weight


class Transformer(nn.Module):
    config: ModelConfig

    def setup(self):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=dtype, name="embed")
        self.layers = [DecoderLayer(c, c.is_sparse_layer(i), name=f"layers_{i}") for i in range(c.num_layers)]
        self.final_norm = RMSNorm(c.rms_norm_eps, dtype, name="final_norm")
        if not c.tie_embeddings:
            self.lm_head = Linear(c.vocab_size, dtype=dtype, name="lm_head")

    def embed(self, tokens):
        """tokens (B, T) int32 -> (B, T, d)."""
        return self.embed_tokens(tokens)

    def logits(self, h):
        """h (B, T, d), already final-normed (or the head's own norm) -> (B, T, V) float32."""
        if self.config.tie_embeddings:
            # h . E^T contracted against E's own last axis: no transposed copy of E. (`attend`
            # writes `h @ E.T`, which XLA:CPU lowered to a 113 MB re-layout of the embedding
            # every decoding step for SmolLM2.)
            # On CPU a few rows go through the small-row kernel (kernels/cpu_matmul), like the layers;
            # with the packed copy `for_cpu_decoding` adds, in the layout it reads fastest.
            if self.has_variable("params", LM_HEAD_PACKED):
                table = self.get_variable("params", LM_HEAD_PACKED)
                out = matmul(h.astype(table.dtype), table, "packed")
            else:
                table = self.embed_tokens.embedding
                out = matmul(h.astype(table.dtype), table, "nk")
        else:
            out = self.lm_head(h)
        return out.astype(jnp.float32)

    def __call__(self, tokens, positions, cache: KVCache, tree_mask, *, taps=(), with_logits=True):
        """tokens, positions (B, T) int32; tree_mask (B, T, T) bool; taps: static tuple of layer ids.

        Returns logits (B, T, V) float32 (None unless with_logits), tapped hidden states
        (B, T, len(taps) * d) (outputs of those decoder layers, None if no taps) and the cache with
        the new rows written.
        """
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        x = self.embed(tokens)
        new_k, new_v, tapped = [], [], {}
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, cache.k[i], cache.v[i], cache.lengths, tree_mask)
            new_k.append(k)
            new_v.append(v)
            if i in taps:
                tapped[i] = x
        cache = cache.replace(k=tuple(new_k), v=tuple(new_v))
        features = jnp.concatenate([tapped[i] for i in taps], axis=-1) if taps else None
        logits = self.logits(self.final_norm(x)) if with_logits else None
        return logits, features, cache


def output_rows(config: ModelConfig, params, ids) -> jax.Array:
    """Rows of the LM head for the token ids `ids` (K,) -> (K, d): `h @ rows.T` are the logits
    of those ids (the draft vocabulary of a reduced-vocabulary head)."""
    if config.tie_embeddings:
        return jnp.take(params["embed"]["embedding"], ids, axis=0)
    head = params["lm_head"]
    kernel = head["kernel"] if "kernel" in head else cpu_matmul.unpack(head[PACKED])
    return jnp.take(kernel, ids, axis=1).T


def for_cpu_decoding(config: ModelConfig, params):
    """Target params in the layouts the CPU kernel reads fastest, when it runs here (float32, CPU
    backend, one device): every layer's products packed (`layers.pack_linears`) and, for a tied
    LM head, `lm_head_packed`, the embedding transposed and packed, for one extra copy of the table
    (+113 MB for SmolLM2). Outputs are unchanged; the speed is measured by scripts/profile_round.py.
    Build it once per loaded model (as `Runner` and the benchmark do): inside a jitted call the
    re-layout would be paid on every call. The same params (same object) when the kernel is
    inactive (GPU, several devices, not float32)."""
    table = params["embed"]["embedding"]
    if not cpu_matmul.active(table.dtype):
        return params
    params = pack_linears(params)
    if config.tie_embeddings and LM_HEAD_PACKED not in params and cpu_matmul.packable(*table.shape[::-1]):
        params = {**params, LM_HEAD_PACKED: cpu_matmul.pack_table(table)}
    return params


def init_cache(config: ModelConfig, batch: int, capacity: int) -> KVCache:
    return KVCache.init(config.num_layers, batch, config.num_kv_heads, capacity, config.head_dim,
                        jnp.dtype(config.dtype))


def init_params(config: ModelConfig, key: jax.Array):
    """Random parameters (for tests and timing at real shapes)."""
    model = Transformer(config)
    cache = init_cache(config, 1, 8)
    tokens = jnp.zeros((1, 1), jnp.int32)
    mask = jnp.ones((1, 1, 1), bool)
    return model.init(key, tokens, tokens, cache, mask)["params"]
