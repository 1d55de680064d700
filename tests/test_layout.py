"""Fused q/k/v and gate/up kernels: `fuse` and `split` are inverses, and the fused layer computes
what the per-projection layer of HF transformers computes (checked in test_model.py)."""

import jax
import numpy as np
import pytest

from jetspec_jax import layout


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
def test_split_inverts_fuse(heads, kv_heads):
    d, dh, f = 12, 4, 20
    rng = np.random.default_rng(0)
    flat = {
        "layers_0/attn/q_proj/kernel": rng.normal(size=(d, heads * dh)),
        "layers_0/attn/k_proj/kernel": rng.normal(size=(d, kv_heads * dh)),
        "layers_0/attn/v_proj/kernel": rng.normal(size=(d, kv_heads * dh)),
        "layers_0/attn/q_proj/bias": rng.normal(size=(heads * dh,)),
        "layers_0/attn/k_proj/bias": rng.normal(size=(kv_heads * dh,)),
        "layers_0/attn/v_proj/bias": rng.normal(size=(kv_heads * dh,)),
        "layers_0/attn/o_proj/kernel": rng.normal(size=(heads * dh, d)),
        "layers_0/mlp/gate_proj/kernel": rng.normal(size=(d, f)),
        "layers_0/mlp/up_proj/kernel": rng.normal(size=(d, f)),
        "embed/embedding": rng.normal(size=(30, d)),
    }
    fused = layout.fuse(flat, heads, kv_heads, dh)
    g = heads // kv_heads
    assert set(fused) == {"layers_0/attn/qkv_proj/kernel", "layers_0/attn/qkv_proj/bias",
                          "layers_0/attn/o_proj/kernel", "layers_0/mlp/gate_up_proj/kernel", "embed/embedding"}
    assert fused["layers_0/attn/qkv_proj/kernel"].shape == (d, kv_heads, g + 2, dh)
    # Query head h sits in KV group h // G (the group whose key it attends with), slot h % G.
    qkv = fused["layers_0/attn/qkv_proj/kernel"]
    for h in range(heads):
        np.testing.assert_array_equal(qkv[:, h // g, h % g], flat["layers_0/attn/q_proj/kernel"][:, h * dh:(h + 1) * dh])
    for j in range(kv_heads):
        np.testing.assert_array_equal(qkv[:, j, g], flat["layers_0/attn/k_proj/kernel"][:, j * dh:(j + 1) * dh])
        np.testing.assert_array_equal(qkv[:, j, g + 1], flat["layers_0/attn/v_proj/kernel"][:, j * dh:(j + 1) * dh])
    back = layout.split(fused, heads, kv_heads, dh)
    assert set(back) == set(flat)
    for name in flat:
        np.testing.assert_array_equal(back[name], flat[name])
    shapes = layout.split_shapes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fused), heads, kv_heads, dh)
    assert {k: v.shape for k, v in shapes.items()} == {k: v.shape for k, v in flat.items()}
