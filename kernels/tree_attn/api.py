"""The tree-attention entry point: picks the implementation, nothing else."""

from __future__ import annotations

import jax

from jetspec_jax.kernels.tree_attn.pallas_kernel import tree_attention_pallas
from jetspec_jax.kernels.tree_attn.xla import tree_attention_xla

IMPLEMENTATIONS = ("auto", "pallas", "xla")


def default_implementation() -> str:
    """The Pallas kernel compiles only for GPUs (Triton); elsewhere XLA is the fast path."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def tree_attention(q, k, v, lengths, tree_mask, *, implementation: str = "auto", interpret: bool = False):
    """Attention of N new queries over a KV cache that already holds their own K/V.

    q (B, N, Hq, D); k, v (B, Hkv, S, D) with the N new rows at [lengths[b], lengths[b] + N);
    lengths (B,) int32; tree_mask (B, N, N) bool (ancestor-or-self) -> (B, N, Hq, D).

    implementation: "pallas", "xla", or "auto" (pallas on GPU, else xla). "pallas" falls back to
    xla only for inputs the kernel does not cover (it raises NotImplementedError, e.g. head_dim
    80); every other error propagates. `interpret` runs the Pallas kernel on CPU (tests).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown tree-attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        implementation = default_implementation()
    if implementation == "pallas":
        try:
            return tree_attention_pallas(q, k, v, lengths, tree_mask, interpret=interpret)
        except NotImplementedError:
            pass
    return tree_attention_xla(q, k, v, lengths, tree_mask)
