"""Static, hashable configuration: one frozen dataclass per concern.

Everything here may decide a shape or a code path, so it is a static argument of `jax.jit`.
Values that change from call to call (prompt lengths, seeds, temperatures, max new tokens) are
arrays and never live here: changing them must not recompile.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One decoder-only transformer family: Qwen3, Qwen2/2.5 and Llama/SmolLM2.

    The families differ only through fields: `qk_norm` (Qwen3 per-head RMSNorm on q and k),
    `qkv_bias` (Qwen2 biases on q/k/v projections) and `tie_embeddings` (Llama/SmolLM2 and small
    Qwen3 reuse the embedding as LM head).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qk_norm: bool = False
    qkv_bias: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    # "auto" | "xla" | "pallas" | "pallas_interpret": the tree-attention implementation.
    attention_impl: str = "auto"
    dtype: str = "float32"  # activation / parameter dtype: "float32" | "bfloat16"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unsupported dtype {self.dtype!r}")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling switches. The values (temperature, top-k, top-p) are per-row arrays.

    `sample=False` compiles a greedy-only program (argmax everywhere, no sorting of the vocab).
    """

    sample: bool = False
