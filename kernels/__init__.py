"""Attention kernels (installed as `jetspec_jax.kernels`).

`tree_attention` is the one attention entry point of the project: decoding (N = 1), chains,
trees and prefill (causal tree mask) all go through it.
"""

from jetspec_jax.kernels.tree_attn import tree_attention

__all__ = ["tree_attention"]
