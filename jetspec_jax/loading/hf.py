"""Read a Hugging Face checkpoint directory (config.json + safetensors) into our params pytree.

    config, params = load_hf_dir("path/to/Qwen3-0.6B", dtype="float32")

Supported `model_type`s: qwen3, qwen2, llama (SmolLM2 is llama). Weights come from
`model.safetensors` or the shards a `model.safetensors.index.json` lists, read without torch
(safetensors' flax reader, so bfloat16 files work). torch Linear weights (out, in) are transposed
to our Dense kernels (in, out).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from jetspec_jax.config import ModelConfig
from jetspec_jax.errors import UserError
from jetspec_jax.loading.checkpoint import assemble_params

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")

_LAYER_TENSORS = {
    "input_layernorm.weight": "input_norm/scale",
    "post_attention_layernorm.weight": "post_attn_norm/scale",
    "self_attn.q_proj.weight": "attn/q_proj/kernel",
    "self_attn.k_proj.weight": "attn/k_proj/kernel",
    "self_attn.v_proj.weight": "attn/v_proj/kernel",
    "self_attn.o_proj.weight": "attn/o_proj/kernel",
    "self_attn.q_proj.bias": "attn/q_proj/bias",
    "self_attn.k_proj.bias": "attn/k_proj/bias",
    "self_attn.v_proj.bias": "attn/v_proj/bias",
    "self_attn.q_norm.weight": "attn/q_norm/scale",
    "self_attn.k_norm.weight": "attn/k_norm/scale",
    "mlp.gate_proj.weight": "mlp/gate_proj/kernel",
    "mlp.up_proj.weight": "mlp/up_proj/kernel",
    "mlp.down_proj.weight": "mlp/down_proj/kernel",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "embed/embedding",
    "model.norm.weight": "final_norm/scale",
    "lm_head.weight": "lm_head/kernel",
}


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{file.parent} is not a Hugging Face model directory (no {file.name})") from None
    except ValueError as e:
        raise UserError(f"cannot parse {file}: {e}") from None


def _rope_theta(raw: dict) -> float:
    """RoPE base from either config style, rejecting scaled RoPE we do not implement.

    transformers < 5 writes `rope_theta` and `rope_scaling`; transformers >= 5 writes
    `rope_parameters: {"rope_type": ..., "rope_theta": ...}`.
    """
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    for spec in (params, scaling):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise UserError(f"unsupported rope scaling type {kind!r} (only unscaled RoPE is implemented)")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def hf_config(raw: dict, dtype: str = "float32") -> ModelConfig:
    """Our ModelConfig from a parsed HF config.json."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"unsupported hidden_act {raw['hidden_act']!r} (only silu)")
    if raw.get("use_sliding_window") or "sliding_attention" in (raw.get("layer_types") or ()):
        raise UserError("sliding-window attention is not supported")
    if raw.get("mlp_bias"):
        raise UserError("mlp_bias is not supported")
    # Llama/Qwen3 `attention_bias` also puts a bias on o_proj, which our model does not have.
    if model_type != "qwen2" and raw.get("attention_bias"):
        raise UserError(f"attention_bias (with an o_proj bias) is not supported for {model_type}")
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        return ModelConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            intermediate_size=int(raw["intermediate_size"]),
            rope_theta=_rope_theta(raw),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            qk_norm=model_type == "qwen3",
            qkv_bias=model_type == "qwen2",
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            dtype=dtype,
        )
    except KeyError as e:
        raise UserError(f"config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"bad config.json: {e}") from None


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no weight_map")
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"no model.safetensors or model.safetensors.index.json in {path}")


def _param_path(name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _LAYER_TENSORS:
        return f"layers_{parts[2]}/{_LAYER_TENSORS[parts[3]]}"
    return None


def _read_tensors(files: list[Path], config: ModelConfig) -> dict[str, np.ndarray]:
    tensors = {}
    for file in files:
        if not file.is_file():
            raise UserError(f"missing safetensors shard: {file}")
        try:
            with safe_open(os.fspath(file), framework="flax") as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_embeddings):
                        continue
                    target = _param_path(name)
                    if target is None:
                        raise UserError(f"unexpected tensor {name!r} in {file}")
                    w = np.asarray(f.get_tensor(name))
                    tensors[target] = w.T if target.endswith("/kernel") else w
        except SafetensorError as e:
            raise UserError(f"cannot read {file} (truncated or corrupt?): {e}") from None
    return tensors


def load_hf_dir(path: str | os.PathLike, dtype: str = "float32"):
    """-> (ModelConfig, params) from an HF directory. Raises UserError on anything unusable."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory not found: {path}")
    config = hf_config(_read_json(path / "config.json"), dtype)
    tensors = _read_tensors(_shard_files(path), config)
    return config, assemble_params(config, tensors, source=os.fspath(path))
