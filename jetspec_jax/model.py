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
from jetspec_jax.kernels.cpu_matmul import dot_general, matmul
from jetspec_jax.layers import DecoderLayer, RMSNorm, rope_tables


LM_HEAD_T = "lm_head_t"  # optional target param: the tied embedding transposed, (d, V)


class Transformer(nn.Module):
    config: ModelConfig

    def setup(self):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=dtype, name="embed")
        self.layers = [DecoderLayer(c, c.is_sparse_layer(i), name=f"layers_{i}") for i in range(c.num_layers)]
        self.final_norm = RMSNorm(c.rms_norm_eps, dtype, name="final_norm")
        if not c.tie_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype,
                                    dot_general=dot_general, name="lm_head")

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
            # with the transposed copy `with_lm_head_copy` adds, in the faster (K, N) layout.
            if self.has_variable("params", LM_HEAD_T):
                table = self.get_variable("params", LM_HEAD_T)
                out = matmul(h.astype(table.dtype), table, "kn")
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
    return jnp.take(params["lm_head"]["kernel"], ids, axis=1).T


def with_lm_head_copy(config: ModelConfig, params):
    """Target params plus `lm_head_t`, the tied embedding transposed to (d, V), when the CPU
    small-row kernel computes the logits: it streams a (K, N) table faster than the (N, K)
    embedding (scripts/profile_round.py on our development machine: an AR step 22.8 against 23.2 ms,
    a 4-node round 29.5 against 31.3 ms), for one extra copy of the table in memory. Build it once
    per loaded model (as `Runner` and the benchmark do): inside a jitted call the transpose would
    be paid on every call. Unchanged params (same object) when there is nothing to gain: untied
    head, not float32, kernel inactive (GPU, several devices), or the copy exists."""
    if not config.tie_embeddings or LM_HEAD_T in params:
        return params
    table = params["embed"]["embedding"]
    if not (cpu_matmul.active(table.dtype) and cpu_matmul.fits(1, table.shape[1], table.shape[0], "kn")):
        return params
    return {**params, LM_HEAD_T: jax.jit(jnp.transpose)(table)}


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
