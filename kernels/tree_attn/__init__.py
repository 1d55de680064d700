# `tree_attention` is the entry point; the kernel and the reference are exported for tests and
# benchmarks that want one implementation explicitly (with their own block sizes).
from jetspec_jax.kernels.tree_attn.api import tree_attention
from jetspec_jax.kernels.tree_attn.pallas_kernel import BlockSizes, tree_attention_pallas
from jetspec_jax.kernels.tree_attn.reference import tree_attention_reference

__all__ = ["BlockSizes", "tree_attention", "tree_attention_pallas", "tree_attention_reference"]
