"""Random weights at real shapes, without running Flax init (for GPU timing at Qwen3-8B size).

    params = random_like(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))), seed=0)

`eval_shape` gives every leaf's shape for free; each leaf is then filled by a small jitted
generator (compiled once per distinct shape). Norm scales are 1, float weights N(0, 0.02), which
keeps activations finite in bf16 through 36 layers; integer leaves (a head's draft vocabulary
table `d2t`) are 0..K-1, distinct ids inside any vocabulary of at least K tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def random_like(shapes, seed: int, std: float = 0.02):
    """A pytree of ShapeDtypeStructs -> arrays of those shapes and dtypes (see the module doc)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    key = jax.random.key(seed)
    filled = []
    for i, (path, leaf) in enumerate(leaves):
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            filled.append(jnp.arange(leaf.size, dtype=leaf.dtype).reshape(leaf.shape))
        elif getattr(path[-1], "key", None) == "scale":
            filled.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            filled.append(normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype, std))
    return jax.tree_util.tree_unflatten(treedef, filled)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def normal(key, shape, dtype, std):
    """std * N(0, 1) of `shape`, drawn in float32 and cast to `dtype`."""
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
