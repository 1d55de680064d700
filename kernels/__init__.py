"""Kernels (installed as `jetspec_jax.kernels`).

`tree_attention` is the one attention entry point of the project: decoding (N = 1), chains,
trees and prefill (causal tree mask) all go through it. `cpu_matmul` runs the products of a few
rows (a decoding step, a tree's verification, the draft) on CPU at the speed of reading the
weights; the layers reach it through Flax's `dot_general=`.
"""

from jetspec_jax.kernels.tree_attn import tree_attention

__all__ = ["tree_attention"]
