"""Read a Hugging Face checkpoint directory (config.json + safetensors) into our params pytree.

    config, params = load_hf_dir("path/to/Qwen3-0.6B", dtype="float32")

Supported `model_type`s: qwen3, qwen3_moe, qwen2, llama (SmolLM2 is llama). Weights come from
`model.safetensors` or the shards a `model.safetensors.index.json` lists, read without torch
(safetensors' flax reader, so bfloat16 files work). torch Linear weights (out, in) are transposed
to our Dense kernels (in, out).

Qwen3-MoE experts are read in either on-disk layout: one tensor per expert and projection,
`mlp.experts.{e}.{gate,up,down}_proj.weight` (HF checkpoints, and what transformers 5.x
`save_pretrained` writes), or the fused 3D tensors transformers 5.x holds in memory,
`mlp.experts.gate_up_proj` (E, 2F, d) and `mlp.experts.down_proj` (E, d, F). Both become the
stacked kernels of moe.py.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from jetspec_jax.config import ModelConfig
from jetspec_jax.errors import UserError
from jetspec_jax.loading.checkpoint import assemble_params

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe", "qwen2", "llama")

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
    "mlp.gate.weight": "mlp/router/kernel",  # Qwen3-MoE router (E, d)
}
# Qwen3-MoE experts, one tensor per expert: "mlp.experts.{e}.<name>" -> stacked (E, ...) param.
_EXPERT_TENSORS = {
    "gate_proj.weight": "mlp/experts/gate_proj",
    "up_proj.weight": "mlp/experts/up_proj",
    "down_proj.weight": "mlp/experts/down_proj",
}
# Config fields of other MoE families (shared experts, other routers) that Qwen3-MoE lacks: a
# config that sets one would need arithmetic we do not have. field -> the value that means "off".
_UNSUPPORTED_MOE_FIELDS = {
    "shared_expert_intermediate_size": 0, "n_shared_experts": 0, "num_shared_experts": 0,
    "scoring_func": "softmax", "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 1.0, "moe_layer_freq": 1, "first_k_dense_replace": 0,
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


def rope_theta(raw: dict) -> float:
    """RoPE base from either config style, rejecting scaled RoPE we do not implement (targets and
    draft heads alike: both config.json files are Qwen3Config-style).

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
    moe = _moe_fields(raw) if model_type == "qwen3_moe" else {}
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
            rope_theta=rope_theta(raw),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            qkv_bias=model_type == "qwen2",
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            dtype=dtype,
            **moe,
        )
    except KeyError as e:
        raise UserError(f"config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"bad config.json: {e}") from None


def _moe_fields(raw: dict) -> dict:
    """ModelConfig's MoE fields from a qwen3_moe config.json (transformers 5.x writes the expert
    count as `num_local_experts`, Qwen's own configs as `num_experts`)."""
    for field, off in _UNSUPPORTED_MOE_FIELDS.items():
        if raw.get(field) not in (None, off):
            raise UserError(f"unsupported MoE option {field}={raw[field]!r} for qwen3_moe (only top-k softmax "
                            f"routing without shared experts is implemented)")
    counts = {raw[k] for k in ("num_experts", "num_local_experts") if raw.get(k) is not None}
    if len(counts) > 1:
        raise UserError(f"config.json gives two expert counts: num_experts and num_local_experts {sorted(counts)}")
    try:
        num_experts = int(counts.pop()) if counts else 128  # Qwen3MoeConfig's default
        top_k = int(raw.get("num_experts_per_tok", 8))
        fields = dict(
            num_experts=num_experts, num_experts_per_tok=top_k,
            moe_intermediate_size=int(raw.get("moe_intermediate_size", 768)),
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            decoder_sparse_step=int(raw.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(int(i) for i in raw.get("mlp_only_layers") or ()),
        )
    except (TypeError, ValueError) as e:
        raise UserError(f"bad MoE field in config.json: {e}") from None
    if num_experts < 0 or (num_experts and not 0 < top_k <= num_experts):
        raise UserError(f"num_experts_per_tok={top_k} must be between 1 and num_experts={num_experts}")
    if fields["decoder_sparse_step"] < 1 or fields["moe_intermediate_size"] < 1:
        raise UserError("decoder_sparse_step and moe_intermediate_size must be >= 1")
    return fields


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


def _param_path(name: str) -> tuple[str, int | None] | None:
    """HF tensor name -> (our param path, expert index or None), or None if unknown."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name], None
    parts = name.split(".", 3)
    if len(parts) != 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return None
    layer, rest = f"layers_{parts[2]}/", parts[3]
    if rest in _LAYER_TENSORS:
        return layer + _LAYER_TENSORS[rest], None
    expert = rest.split(".", 3)  # "mlp.experts.{e}.gate_proj.weight" or fused "mlp.experts.gate_up_proj"
    if expert[:2] == ["mlp", "experts"] and len(expert) == 4 and expert[2].isdigit() and expert[3] in _EXPERT_TENSORS:
        return layer + _EXPERT_TENSORS[expert[3]], int(expert[2])
    if rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
        return layer + rest.replace(".", "/"), None
    return None


def _host_layout(target: str, w: np.ndarray) -> dict[str, np.ndarray]:
    """One HF tensor (torch layout) -> our param(s): Linear weights transposed to (in, out)."""
    if target.endswith("experts/gate_up_proj") and w.ndim == 3:  # fused (E, 2F, d): gate rows, then up rows
        gate, up = np.split(w, 2, axis=1)
        prefix = target[: -len("gate_up_proj")]
        return {prefix + "gate_proj": gate.transpose(0, 2, 1), prefix + "up_proj": up.transpose(0, 2, 1)}
    if target.endswith("experts/down_proj") and w.ndim == 3:  # fused (E, d, F)
        return {target: w.transpose(0, 2, 1)}
    if target.endswith(("/kernel", "_proj")):  # per-expert projections end in "_proj"
        return {target: w.T}
    return {target: w}


def check_experts(experts, config: ModelConfig) -> None:
    """experts: (param path, expert index) pairs read from a checkpoint. UserError unless every
    path has exactly the experts 0..num_experts-1."""
    for target in sorted({t for t, _ in experts}):
        have = {e for t, e in experts if t == target}
        want = set(range(config.num_experts))
        if have != want:
            what = f"lacks expert {min(want - have)}" if want - have else f"has an extra expert {max(have - want)}"
            raise UserError(f"{target}: the checkpoint {what} (num_experts={config.num_experts})")


def checkpoint_tensors(files: list[Path], config: ModelConfig, framework: str):
    """Walk the safetensors files: yield (file, open handle, tensor name, param path, expert index
    or None) for every tensor to load, skipping rotary buffers and a tied `lm_head.weight`.
    UserError for a missing file or a tensor of another architecture. Callers read through the
    handle inside their loop and wrap it in `reading(file)`, which turns a damaged file's error
    into a UserError."""
    for file in files:
        if not file.is_file():
            raise UserError(f"missing safetensors shard: {file}")
        with reading(file), safe_open(os.fspath(file), framework=framework) as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_embeddings):
                    continue
                found = _param_path(name)
                if found is None:
                    raise UserError(f"unexpected tensor {name!r} in {file}")
                yield (file, f, name, *found)


@contextlib.contextmanager
def reading(file: Path):
    try:
        yield
    except SafetensorError as e:
        raise UserError(f"cannot read {file} (truncated or corrupt?): {e}") from None


def _read_tensors(files: list[Path], config: ModelConfig) -> dict[str, np.ndarray]:
    tensors, experts = {}, {}
    for file, f, name, target, expert in checkpoint_tensors(files, config, "flax"):
        with reading(file):
            value = np.asarray(f.get_tensor(name))
        for key, value in _host_layout(target, value).items():
            if expert is None:
                tensors[key] = value
            else:
                experts[(key, expert)] = value
    check_experts(experts, config)
    for target in sorted({t for t, _ in experts}):
        tensors[target] = np.stack([experts[(target, e)] for e in range(config.num_experts)])
    return tensors


def load_hf_dir(path: str | os.PathLike, dtype: str = "float32"):
    """-> (ModelConfig, params) from an HF directory. Raises UserError on anything unusable."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory not found: {path}")
    config = hf_config(_read_json(path / "config.json"), dtype)
    tensors = _read_tensors(_shard_files(path), config)
    return config, assemble_params(config, tensors, source=os.fspath(path))
