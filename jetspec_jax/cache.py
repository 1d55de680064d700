"""The KV cache: an explicit, preallocated pytree passed in and returned, never mutated.

Slots `[0, lengths[b])` of row b hold committed tokens. A forward over T new tokens writes their
K/V at `[lengths[b], lengths[b] + T)` without moving `lengths`; committing (see `commit_rows`)
decides which of those rows become part of the prefix. Slots past `lengths` are scratch: whatever
they hold never influences attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    k: tuple  # num_layers x (B, Hkv, S, Dh)
    v: tuple  # num_layers x (B, Hkv, S, Dh)
    lengths: jax.Array  # (B,) int32: committed tokens per row

    @classmethod
    def init(cls, num_layers, batch, kv_heads, capacity, head_dim, dtype=jnp.float32):
        shape = (batch, kv_heads, capacity, head_dim)
        zeros = lambda: jnp.zeros(shape, dtype)  # noqa: E731
        return cls(
            k=tuple(zeros() for _ in range(num_layers)),
            v=tuple(zeros() for _ in range(num_layers)),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]


UNROLL_ROWS = 64  # batch sizes up to this get one in-place update per row


def write_rows(layer_cache: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    """Write new rows into one layer's cache.

    layer_cache (B, Hkv, S, Dh); rows (B, T, Hkv, Dh); start (B,) int32 -> (B, Hkv, S, Dh).
    The caller guarantees start + T <= S (dynamic_update_slice would silently clamp).

    One dynamic_update_slice per batch row (B is static and small): XLA updates the buffer in
    place. A vmapped dynamic_update_slice becomes a scatter that XLA:CPU lowers to a select over
    the whole (B, Hkv, S, Dh) cache, i.e. a full copy per layer and per call.
    """
    rows = rows.transpose(0, 2, 1, 3).astype(layer_cache.dtype)  # (B, Hkv, T, Dh)
    if layer_cache.shape[0] > UNROLL_ROWS:  # an unrolled loop over thousands of rows would not compile
        return jax.vmap(lambda c, r, s: jax.lax.dynamic_update_slice(c, r, (0, s, 0)))(layer_cache, rows, start)
    zero = jnp.zeros((), start.dtype)
    for b in range(layer_cache.shape[0]):
        layer_cache = jax.lax.dynamic_update_slice(layer_cache, rows[b : b + 1], (b, zero, start[b], zero))
    return layer_cache


def gather_rows(layer_cache: jax.Array, slots: jax.Array) -> jax.Array:
    """layer_cache (B, Hkv, S, Dh); slots (B, T) int32 -> rows (B, T, Hkv, Dh)."""
    picked = jnp.take_along_axis(layer_cache, slots[:, None, :, None], axis=2)  # (B, Hkv, T, Dh)
    return picked.transpose(0, 2, 1, 3)


def commit_rows(cache: KVCache, slots: jax.Array, num_accepted: jax.Array) -> KVCache:
    """Move the accepted rows of a verification into the prefix.

    slots (B, T) int32: cache slots of the rows to keep, in order (T static; entries past
    num_accepted[b] are ignored); num_accepted (B,) int32 -> cache with those rows copied to
    `[lengths, lengths + T)` and `lengths += num_accepted`.

    slots[:, 0] must equal `lengths`: the first kept row is the round's root, which verification
    wrote in place, so only slots[:, 1:] are copied. With T = 1 (AR decoding) nothing is written:
    a rewrite of the root's own row would be a cache write that XLA cannot order after the
    attention reads of the same buffer, and it would copy every layer's cache to keep it apart.
    """
    moved = slots[:, 1:]
    lengths = cache.lengths + num_accepted.astype(jnp.int32)
    if moved.shape[1] == 0:
        return cache.replace(lengths=lengths)

    def move(layer):
        return write_rows(layer, gather_rows(layer, moved), cache.lengths + 1)

    return cache.replace(
        k=tuple(move(k) for k in cache.k),
        v=tuple(move(v) for v in cache.v),
        lengths=lengths,
    )
