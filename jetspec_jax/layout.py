"""Fused projections: our parameter layout vs the per-projection layout of HF checkpoints.

A decoder layer keeps its query/key/value projections in one kernel and its MLP gate/up
projections in another, so that a decoding step runs 4 matrix products per layer instead of 7
(on CPU the per-product overhead of small matrix-vector products is a large share of a step).
Checkpoints (HF safetensors, GGUF, DFlash heads) store the projections separately; loaders name
them as below and call `fuse`, writers call `split`. Kernels are (in, out) as in Flax.

    per projection                              fused
    attn/q_proj/kernel  (d, H*Dh)               attn/qkv_proj/kernel  (d, Hkv, G+2, Dh)
    attn/k_proj/kernel  (d, Hkv*Dh)             attn/qkv_proj/bias    (Hkv, G+2, Dh)
    attn/v_proj/kernel  (d, Hkv*Dh)             mlp/gate_up_proj/kernel (d, 2, F)
    attn/{q,k,v}_proj/bias
    mlp/gate_proj/kernel (d, F), mlp/up_proj/kernel (d, F)
    mlp/experts/gate_proj (E, d, F)             mlp/experts/gate_up_proj (E, d, 2, F)
    mlp/experts/up_proj   (E, d, F)             (MoE layers: E experts stacked, see moe.py)

G = H / Hkv query heads share a KV head. KV group j holds its G query heads (heads jG..jG+G-1,
the heads that attend with KV head j) followed by its key and its value head, so splitting the
Hkv axis over devices keeps every group whole (see sharding.py). Worked example, SmolLM2-135M
(d 576, 9 query and 3 KV heads of 64): qkv kernel (576, 3, 5, 64); [:, 1, 0:3] are query heads
3-5, [:, 1, 3] key head 1, [:, 1, 4] value head 1.

Keys are "/"-joined parameter paths with any prefix (e.g. "layers_3/attn/q_proj/kernel"); values
are numpy or JAX arrays (or `jax.ShapeDtypeStruct`s under `jax.eval_shape`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_ATTN = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj")


def _xp(parts):
    """numpy for host arrays (loaders), jax.numpy for device arrays and tracers."""
    return np if all(isinstance(p, np.ndarray) for p in parts) else jnp


def flatten(tree) -> dict:
    """Nested params -> {"/"-joined path: leaf}, the keys this module works on."""
    import jax

    return {"/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict) -> dict:
    """{"/"-joined path: leaf} -> nested dicts (the inverse of `flatten`)."""
    tree = {}
    for name, leaf in flat.items():
        *modules, last = name.split("/")
        node = tree
        for key in modules:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


def _prefixes(flat: dict, suffix: str) -> list[str]:
    return sorted(k[: -len(suffix)] for k in flat if k.endswith(suffix))


def fuse(flat: dict, num_heads: int, num_kv_heads: int, head_dim: int) -> dict:
    """Per-projection tensors -> fused ones (other keys pass through). Missing pieces are left
    as they are, so that the caller's check names what is missing."""
    out = dict(flat)
    g = num_heads // num_kv_heads
    for prefix in _prefixes(flat, "attn/q_proj/kernel"):
        for leaf in ("kernel", "bias"):
            names = [f"{prefix}attn/{p}/{leaf}" for p in _ATTN]
            if not all(n in flat for n in names):
                continue
            q, k, v = (out.pop(n) for n in names)
            lead = q.shape[:-1]  # (d,) for kernels, () for biases
            q = q.reshape(*lead, num_kv_heads, g, head_dim)
            k = k.reshape(*lead, num_kv_heads, 1, head_dim)
            v = v.reshape(*lead, num_kv_heads, 1, head_dim)
            out[f"{prefix}attn/qkv_proj/{leaf}"] = _xp([q, k, v]).concatenate([q, k, v], axis=-2)
    for prefix in _prefixes(flat, "mlp/gate_proj/kernel"):
        names = [f"{prefix}mlp/{p}/kernel" for p in _MLP]
        if all(n in flat for n in names):
            gate, up = (out.pop(n) for n in names)
            out[f"{prefix}mlp/gate_up_proj/kernel"] = _xp([gate, up]).stack([gate, up], axis=-2)
    for prefix in _prefixes(flat, "experts/gate_proj"):
        names = [f"{prefix}experts/{p}" for p in _MLP]
        if all(n in flat for n in names):
            gate, up = (out.pop(n) for n in names)
            out[f"{prefix}experts/gate_up_proj"] = _xp([gate, up]).stack([gate, up], axis=-2)
    return out


def split(flat: dict, num_heads: int, num_kv_heads: int, head_dim: int) -> dict:
    """Fused tensors -> per-projection ones (the inverse of `fuse`)."""
    out = dict(flat)
    g = num_heads // num_kv_heads
    for key in [k for k in flat if "/qkv_proj/" in k or k.startswith("qkv_proj/")]:
        prefix, leaf = key.rsplit("qkv_proj/", 1)
        x = out.pop(key)
        lead = x.shape[:-3]
        q = x[..., :g, :].reshape(*lead, num_heads * head_dim)
        k = x[..., g, :].reshape(*lead, num_kv_heads * head_dim)
        v = x[..., g + 1, :].reshape(*lead, num_kv_heads * head_dim)
        for name, value in zip(_ATTN, (q, k, v)):
            out[f"{prefix}{name}/{leaf}"] = value
    for key in [k for k in flat if k.endswith("gate_up_proj/kernel")]:
        prefix = key[: -len("gate_up_proj/kernel")]
        x = out.pop(key)
        out[f"{prefix}gate_proj/kernel"], out[f"{prefix}up_proj/kernel"] = x[..., 0, :], x[..., 1, :]
    for key in [k for k in flat if k.endswith("experts/gate_up_proj")]:
        prefix = key[: -len("gate_up_proj")]
        x = out.pop(key)
        out[f"{prefix}gate_proj"], out[f"{prefix}up_proj"] = x[..., 0, :], x[..., 1, :]
    return out


def split_shapes(flat: dict, num_heads: int, num_kv_heads: int, head_dim: int) -> dict:
    """`split` on `jax.ShapeDtypeStruct` leaves: the per-projection shapes a checkpoint must hold."""
    import jax

    return jax.eval_shape(lambda t: split(t, num_heads, num_kv_heads, head_dim), flat)
