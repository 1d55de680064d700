"""Plain-jnp tree attention: the reference every kernel is tested against, and the XLA path."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def visible_slots(lengths: jax.Array, tree_mask: jax.Array, num_slots: int) -> jax.Array:
    """Which cache slots each query sees.

    lengths (B,) int32, tree_mask (B, N, N) bool -> (B, N, S) bool.

    Worked example, lengths = [2], N = 3, S = 6, tree_mask = root + two children of the root:
        tree_mask = [[1,0,0],        visible = [[1,1, 1,0,0, 0],
                     [1,1,0],                   [1,1, 1,1,0, 0],
                     [1,0,1]]                   [1,1, 1,0,1, 0]]
    Slots [0, 2) are the committed prefix, [2, 5) the tree, slot 5 unused.
    """
    n = tree_mask.shape[-1]
    slot = jnp.arange(num_slots, dtype=jnp.int32)[None, :]  # (1, S)
    rel = slot - lengths[:, None]  # (B, S): index into the tree, negative for the prefix
    in_tree = (rel >= 0) & (rel < n)
    tree_part = jnp.take_along_axis(
        tree_mask, jnp.clip(rel, 0, n - 1)[:, None, :].repeat(tree_mask.shape[1], axis=1), axis=-1
    )  # (B, N, S)
    return (rel < 0)[:, None, :] | (in_tree[:, None, :] & tree_part)


def tree_attention_reference(q, k, v, lengths, tree_mask):
    """q (B, N, Hq, D); k, v (B, Hkv, S, D); lengths (B,); tree_mask (B, N, N) -> (B, N, Hq, D).

    Accumulates in float32 and returns q.dtype. Slots at >= lengths + N may hold anything (NaN
    included) and never influence the result.
    """
    b, n, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    visible = visible_slots(lengths, tree_mask, s)  # (B, N, S)
    used = (jnp.arange(s)[None, :] < (lengths + n)[:, None])[:, None, :, None]  # (B, 1, S, 1)
    k = jnp.where(used, k, 0).astype(jnp.float32)
    v = jnp.where(used, v, 0).astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(b, n, hkv, g, d)
    scores = jnp.einsum("bnhgd,bhsd->bhgns", qg, k) * (d**-0.5)
    scores = jnp.where(visible[:, None, None, :, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgns,bhsd->bnhgd", probs, v)
    return out.reshape(b, n, hq, d).astype(q.dtype)
