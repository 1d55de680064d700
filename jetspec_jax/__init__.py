"""jetspec-jax: lossless speculative decoding with causal parallel tree drafting, in JAX.

Public names:
    generate            prefill + every round in one jitted while_loop (decode.py)
    speculative_step    one pure round: draft -> tree -> verify -> accept -> commit (step.py)
    DecodeConfig        the static description of a run (target, head, tree, sampling switch)
    TreeConfig          node budget N, width W, depth D and the tree kind (tree.py)
    ModelConfig, HeadConfig, KVCache, DecodeState
The command line is `python -m jetspec_jax.generate` (jetspec_jax/cli.py).

The names are imported on first use (PEP 562), so that importing a submodule that needs no JAX
(the CLI's argument parser: `--help`) does not pay for importing JAX (seconds on a small CPU).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_SOURCES = {
    "KVCache": "jetspec_jax.cache",
    "ModelConfig": "jetspec_jax.config",
    "generate": "jetspec_jax.decode",
    "HeadConfig": "jetspec_jax.head",
    "DecodeConfig": "jetspec_jax.step",
    "DecodeState": "jetspec_jax.step",
    "speculative_step": "jetspec_jax.step",
    "TreeConfig": "jetspec_jax.tree",
}
__all__ = sorted(_SOURCES)

if TYPE_CHECKING:
    from jetspec_jax.cache import KVCache
    from jetspec_jax.config import ModelConfig
    from jetspec_jax.decode import generate
    from jetspec_jax.head import HeadConfig
    from jetspec_jax.step import DecodeConfig, DecodeState, speculative_step
    from jetspec_jax.tree import TreeConfig


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module 'jetspec_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_SOURCES))
