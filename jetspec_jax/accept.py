"""Lossless acceptance of a verified draft tree (DESIGN.md section 2, step 4).

The target produced one token `y[i]` per tree node: its argmax (greedy) or one independent sample
from its processed distribution (sampling). Node i *matches* when its token is what the target
produced at its parent: `tokens[i] == y[parents[i]]`. The accepted path is the deepest node whose
whole ancestor chain matches; the bonus token is `y` at that node.

This is exactly the target's own output: following the tree from the root and taking the child
whose token equals the target's token is the same as decoding token by token, because siblings
carry distinct tokens (at most one child can match) and each node has its own independent sample.
Draft probabilities are never used.

Worked example (greedy), tree with root 0 and nodes 1, 2 (children of 0) and 3 (child of 1):
    tokens  = [r, a, b, c]   parents = [-1, 0, 0, 1]
    y       = [a, c, x, z]   (target argmax at each node)
    matches = [T, T, F, T]   (1: a == y[0]; 2: b != y[0]; 3: c == y[1])
    chain ok= [T, T, F, T]   -> best = 3 (depth 2), path = [0, 1, 3], bonus = y[3] = z
    emitted = [a, c, z]      (3 tokens for one target forward)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Accepted:
    best: jax.Array  # (B,) int32: deepest node whose ancestor chain matches
    num_accepted: jax.Array  # (B,) int32: depth of `best` = draft tokens accepted
    path: jax.Array  # (B, D+1) int32: node index at each depth along root..best (junk past num_accepted)
    emitted: jax.Array  # (B, D+1) int32: accepted draft tokens then the bonus (junk past num_accepted)


def accept(tokens, parents, depths, tree_mask, target_tokens, max_depth: int) -> Accepted:
    """tokens, parents, depths (B, N) int32; tree_mask (B, N, N) bool (ancestor-or-self);
    target_tokens (B, N) int32 (the target's argmax or sample at each node); max_depth D static.
    """
    parent_token = jnp.take_along_axis(target_tokens, jnp.maximum(parents, 0), axis=1)
    matches = (tokens == parent_token) | (parents < 0)  # (B, N); the root always matches
    # A node is reachable iff no node on its ancestor-or-self chain mismatches.
    chain_ok = ~jnp.any(tree_mask & ~matches[:, None, :], axis=-1)  # (B, N)
    # At most one reachable node per depth (siblings are distinct), so the deepest is unique.
    best = jnp.argmax(jnp.where(chain_ok, depths, -1), axis=1).astype(jnp.int32)
    num_accepted = jnp.take_along_axis(depths, best[:, None], axis=1)[:, 0]
    on_path = jnp.take_along_axis(tree_mask, best[:, None, None], axis=1)[:, 0]  # (B, N)
    levels = jnp.arange(max_depth + 1, dtype=jnp.int32)
    at_level = on_path[:, None, :] & (depths[:, None, :] == levels[None, :, None])  # (B, D+1, N)
    path = jnp.argmax(at_level, axis=-1).astype(jnp.int32)  # (B, D+1)
    path_tokens = jnp.take_along_axis(tokens, path, axis=1)  # (B, D+1): root, then accepted
    bonus = jnp.take_along_axis(target_tokens, best[:, None], axis=1)  # (B, 1)
    shifted = jnp.concatenate([path_tokens[:, 1:], bonus], axis=1)  # (B, D+1)
    emitted = jnp.where(levels[None, :] == num_accepted[:, None], bonus, shifted)
    return Accepted(best=best, num_accepted=num_accepted, path=path, emitted=emitted)
