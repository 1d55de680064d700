"""Static, hashable configuration: one frozen dataclass per concern.

Everything here may decide a shape or a code path, so it is a static argument of `jax.jit`.
Values that change from call to call (prompt lengths, seeds, temperatures, max new tokens) are
arrays and never live here: changing them must not recompile.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One decoder-only transformer family: Qwen3, Qwen3-MoE, Qwen2/2.5 and Llama/SmolLM2.

    The families differ only through fields: `qk_norm` (Qwen3 per-head RMSNorm on q and k),
    `qkv_bias` (Qwen2 biases on q/k/v projections), `tie_embeddings` (Llama/SmolLM2 and small
    Qwen3 reuse the embedding as LM head) and the MoE fields (Qwen3-MoE: `num_experts` > 0).

    MoE fields, as HF `Qwen3MoeConfig`: layer i runs the sparse block (moe.py) when
    `num_experts > 0`, `i not in mlp_only_layers` and `(i + 1) % decoder_sparse_step == 0`;
    other layers run the dense MLP of width `intermediate_size`. The defaults (no experts) leave
    every dense model unchanged.
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
    num_experts: int = 0  # routed experts per sparse layer; 0: a dense model
    num_experts_per_tok: int = 0  # top-k experts each token is routed to
    moe_intermediate_size: int = 0  # each expert's SwiGLU width
    norm_topk_prob: bool = False  # renormalize the top-k routing weights to sum to 1
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()  # layers that keep the dense MLP

    def __post_init__(self):
        # A tuple, also when read back from JSON as a list: the config must stay hashable.
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, {self.num_experts}]")
        if self.num_experts and self.moe_intermediate_size < 1:
            raise ValueError("moe_intermediate_size must be >= 1 when num_experts > 0")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unsupported dtype {self.dtype!r}")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def is_sparse_layer(self, i: int) -> bool:
        """Whether decoder layer i runs the MoE block (HF Qwen3MoeDecoderLayer's rule)."""
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)
