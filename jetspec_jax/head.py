"""The draft head: a few Qwen3 decoder layers reading the target's tapped hidden states.

Parameter layout and arithmetic follow DFlash (`dflash.model.DFlashDraftModel`), so JetSpec and
DFlash Hugging Face heads load unchanged (see `loading/head_io.py`); `causal` picks JetSpec's
causal block (lower-triangular) or DFlash's bidirectional one.

One round, for a batch row with `c` committed tokens (DESIGN.md section 2):

    cache = head.apply(p, features, positions, cache, method=DraftHead.append_context)
    cache = cache.replace(lengths=cache.lengths + accepted)      # the caller commits
    hidden, cache = head.apply(p, block_embeddings, block_positions, cache)
    draft_logits = target.logits(hidden[:, 1:])                   # row j predicts position c + j

The context keys/values of every layer are `k_proj`/`v_proj` of `hidden_norm(fc(features))`,
with no `input_layernorm` (exactly as DFlash), cached across rounds. The block
`[root, MASK x (Bs - 1)]` (embedded with the target's embedding) sees the whole context plus
itself under a lower-triangular (causal) or all-ones (bidirectional) mask.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jetspec_jax.cache import KVCache, write_rows
from jetspec_jax.config import ModelConfig
from jetspec_jax.errors import UserError
from jetspec_jax.layers import DecoderLayer, Linear, RMSNorm, rope_tables


def default_target_layer_ids(num_target_layers: int, num_head_layers: int) -> tuple[int, ...]:
    """Which target layers feed the head: `[L//2]` for one head layer, else `n` ids evenly
    spaced from 1 to L-3, rounded (same as `dflash.model.build_target_layer_ids`).

    Example: L = 36, n = 5 -> (1, 9, 17, 25, 33).
    """
    if num_head_layers == 1:
        return (num_target_layers // 2,)
    start, end = 1, num_target_layers - 3
    span = end - start
    # Python's round (half to even), as DFlash uses.
    return tuple(round(start + i * span / (num_head_layers - 1)) for i in range(num_head_layers))


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Static description of a draft head. Also serves as the `config` of `DecoderLayer`."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_target_layers: int
    mask_token_id: int
    block_size: int = 16
    target_layer_ids: tuple[int, ...] = ()  # () -> default_target_layer_ids(...)
    causal: bool = True  # True: JetSpec causal block; False: DFlash bidirectional block
    rope_theta: float = 10000.0  # Qwen3Config default
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False  # HF `attention_bias` (biases on q/k/v and, as in DFlash, on o_proj)
    attention_impl: str = "auto"
    dtype: str = "float32"
    # K: the head drafts over a table of K target ids (params["d2t"], K,) instead of the whole
    # vocabulary, so its output projection costs K / vocab_size of the full one. None: all ids.
    draft_vocab_size: int | None = None
    # Orders of the answer n-gram table shipped with the head (ngrams.py; params["ngram_keys"],
    # params["ngram_next"]): the prompt-lookup branch of rows whose text has no match. (): none.
    ngram_orders: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.target_layer_ids:
            ids = default_target_layer_ids(self.num_target_layers, self.num_layers)
            object.__setattr__(self, "target_layer_ids", ids)
        object.__setattr__(self, "target_layer_ids", tuple(int(i) for i in self.target_layer_ids))
        object.__setattr__(self, "ngram_orders", tuple(sorted(int(n) for n in self.ngram_orders)))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.block_size < 2:
            raise ValueError(f"block_size={self.block_size} must be at least 2 (root + one draft)")
        if self.draft_vocab_size is not None and not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size={self.draft_vocab_size} must lie in 1..vocab_size={self.vocab_size}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unsupported dtype {self.dtype!r}")

    @property
    def qk_norm(self) -> bool:
        """Qwen3-style heads always normalise q and k per head."""
        return True

    @property
    def o_bias(self) -> bool:
        """DFlash (like HF Qwen3) puts a bias on o_proj exactly when `attention_bias` is set."""
        return self.qkv_bias

    @property
    def feature_size(self) -> int:
        """Width of the concatenated target taps fed to `fc`: taps * d."""
        return len(self.target_layer_ids) * self.hidden_size

    def replace(self, **changes) -> "HeadConfig":
        return dataclasses.replace(self, **changes)


class DraftHead(nn.Module):
    """DFlash parameter layout: `fc`, `hidden_norm`, `layers_{i}` (Qwen3 decoder layers), `norm`."""

    config: HeadConfig

    def setup(self):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        self.fc = Linear(c.hidden_size, dtype=dtype, name="fc")
        self.hidden_norm = RMSNorm(c.rms_norm_eps, dtype, name="hidden_norm")
        self.layers = [DecoderLayer(c, name=f"layers_{i}") for i in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, dtype, name="norm")

    def append_context(self, features, positions, cache: KVCache) -> KVCache:
        """Project target features into every layer's context K/V.

        features (B, T, taps*d); positions (B, T) int32 (absolute) -> cache with the rows written
        at `[lengths, lengths + T)` of each layer. `lengths` is not advanced: the caller commits
        the rows it keeps (a row b may keep fewer than T). Needs `lengths + T <= capacity`.
        """
        c = self.config
        ctx = self.hidden_norm(self.fc(features.astype(jnp.dtype(c.dtype))))  # (B, T, d)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)  # (B, T, Dh)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            k, v = layer.attn.keys_values(ctx, cos, sin)  # (B, T, Hkv, Dh); no input_norm
            new_k.append(write_rows(cache.k[i], k, cache.lengths))
            new_v.append(write_rows(cache.v[i], v, cache.lengths))
        return cache.replace(k=tuple(new_k), v=tuple(new_v))

    def __call__(self, block_embeddings, positions, cache: KVCache):
        """Run the block over the cached context.

        block_embeddings (B, Bs, d); positions (B, Bs) int32 (`lengths + arange(Bs)` in a round)
        -> hidden (B, Bs, d) after the head's final norm, and the cache with the block's K/V
        written at `[lengths, lengths + Bs)`. Those rows lie past `lengths`, so they are scratch
        that no later call reads: carry the returned cache forward (XLA then updates it in place
        instead of copying it). Bs is usually `config.block_size`. Needs `lengths + Bs <= capacity`.
        """
        c = self.config
        b, bs, _ = block_embeddings.shape
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)  # (B, Bs, Dh)
        block_mask = block_attention_mask(bs, c.causal)
        tree_mask = jnp.broadcast_to(block_mask, (b, bs, bs))
        x = block_embeddings.astype(jnp.dtype(c.dtype))
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, cache.k[i], cache.v[i], cache.lengths, tree_mask)
            new_k.append(k)
            new_v.append(v)
        return self.norm(x), cache.replace(k=tuple(new_k), v=tuple(new_v))


def block_attention_mask(block_size: int, causal: bool) -> jax.Array:
    """(Bs, Bs) bool: which block rows each block row sees (the context is always all visible).

    causal, Bs = 3: [[1,0,0], [1,1,0], [1,1,1]]; bidirectional: all ones.
    """
    ones = jnp.ones((block_size, block_size), bool)
    return jnp.tril(ones) if causal else ones


def init_head_cache(cfg: HeadConfig, batch: int, capacity: int) -> KVCache:
    """Empty context cache; capacity must cover the longest context plus one block."""
    return KVCache.init(cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim,
                        jnp.dtype(cfg.dtype))


def _touch_all(head: DraftHead, features, embeddings, positions, cache):
    """Init helper: run both methods so every parameter (fc, hidden_norm, layers, norm) exists."""
    cache = head.append_context(features, positions, cache)
    return head(embeddings, positions, cache)


@functools.partial(jax.jit, static_argnums=0)
def init_head_params(cfg: HeadConfig, key: jax.Array):
    """Random parameters in the layout `load_head_dir` produces (tests, timing, training init).

    Jitted (cfg static): op-by-op Flax init is slow, and at real shapes it would materialise
    every intermediate on the host.
    """
    dtype = jnp.dtype(cfg.dtype)
    features = jnp.zeros((1, 1, cfg.feature_size), dtype)
    embeddings = jnp.zeros((1, 1, cfg.hidden_size), dtype)
    positions = jnp.zeros((1, 1), jnp.int32)
    cache = init_head_cache(cfg, 1, 2)
    return DraftHead(cfg).init(key, features, embeddings, positions, cache, method=_touch_all)["params"]


def check_draft_vocab(d2t, head: HeadConfig, where: str) -> None:
    """One-line UserError unless d2t (host array) is K distinct target ids inside the vocabulary."""
    import numpy as np

    d2t = np.asarray(d2t)
    k = head.draft_vocab_size
    if d2t.ndim != 1 or len(d2t) != k:
        raise UserError(f"{where}: draft vocabulary table d2t has shape {d2t.shape}, the config says ({k},)")
    if len(d2t) and not (d2t.min() >= 0 and d2t.max() < head.vocab_size):
        raise UserError(f"{where}: d2t holds ids outside the target's vocabulary 0..{head.vocab_size - 1}")
    if len(np.unique(d2t)) != len(d2t):
        raise UserError(f"{where}: d2t repeats target ids (a draft vocabulary lists each id once)")


def check_head_fits(head: HeadConfig, target: ModelConfig) -> None:
    """Raise a one-line UserError if the head cannot draft for this target."""
    if head.hidden_size != target.hidden_size:
        raise UserError(
            f"draft head hidden size {head.hidden_size} does not match the target's {target.hidden_size}"
        )
    if head.vocab_size != target.vocab_size:
        raise UserError(
            f"draft head vocabulary {head.vocab_size} does not match the target's {target.vocab_size}"
        )
    if head.num_target_layers != target.num_layers:
        raise UserError(
            f"draft head was built for a {head.num_target_layers}-layer target, "
            f"this target has {target.num_layers} layers"
        )
    bad = [i for i in head.target_layer_ids if not 0 <= i < target.num_layers]
    if bad:
        raise UserError(
            f"draft head taps target layers {list(head.target_layer_ids)}, "
            f"but the target has layers 0..{target.num_layers - 1}"
        )
    if not 0 <= head.mask_token_id < target.vocab_size:
        raise UserError(
            f"draft head mask token {head.mask_token_id} is outside the target's vocabulary "
            f"of {target.vocab_size}"
        )
