"""jetspec-jax: lossless speculative decoding with causal parallel tree drafting, in JAX.

Public names:
    generate            prefill + every round in one jitted while_loop (decode.py)
    speculative_step    one pure round: draft -> tree -> verify -> accept -> commit (step.py)
    DecodeConfig        the static description of a run (target, head, tree, sampling switch)
    TreeConfig          node budget N, width W, depth D and the tree kind (tree.py)
    ModelConfig, HeadConfig, KVCache, DecodeState
The command line is `python -m jetspec_jax.generate` (jetspec_jax/cli.py).
"""

from jetspec_jax.cache import KVCache
from jetspec_jax.config import ModelConfig
from jetspec_jax.decode import generate
from jetspec_jax.head import HeadConfig
from jetspec_jax.step import DecodeConfig, DecodeState, speculative_step
from jetspec_jax.tree import TreeConfig

__all__ = [
    "DecodeConfig", "DecodeState", "HeadConfig", "KVCache", "ModelConfig", "TreeConfig",
    "generate", "speculative_step",
]
