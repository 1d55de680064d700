"""Our own checkpoints: the params pytree (orbax) with the ModelConfig as JSON beside it.

    save_checkpoint(path, config, params)     # atomic: `path` appears complete or not at all
    config, params = load_checkpoint(path)

Layout of a checkpoint directory:
    config.json   the ModelConfig fields (written last)
    params/       an orbax StandardCheckpointer tree

`abstract_params(config)` (shapes and dtypes from `init_params`, never hand-written) is the one
description of what a params tree must look like: loaders check against it, restore targets it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import jax
import numpy as np

from jetspec_jax import layout
from jetspec_jax.config import ModelConfig
from jetspec_jax.errors import UserError
from jetspec_jax.model import init_params

_CONFIG_FILE = "config.json"
_PARAMS_DIR = "params"


@functools.lru_cache(maxsize=16)
def abstract_params(config: ModelConfig):
    """The params pytree of `config` as jax.ShapeDtypeStruct leaves (nothing is allocated).

    Traced from `init_params` with one layer of each kind and those entries repeated: every dense
    decoder layer has the same parameters, and so has every sparse (MoE) one, and tracing all of
    them costs seconds for a 30-layer model.
    Cached per config and shared between layers: treat the result as read-only.
    """
    kinds = {}  # sparse? -> one layer's params
    tree = {}
    for sparse in sorted({config.is_sparse_layer(i) for i in range(config.num_layers)}):
        one_layer = config.replace(num_layers=1, decoder_sparse_step=1, mlp_only_layers=() if sparse else (0,))
        tree = dict(jax.eval_shape(functools.partial(init_params, one_layer), jax.random.key(0)))
        kinds[sparse] = tree.pop("layers_0")
    return {**tree, **{f"layers_{i}": kinds[config.is_sparse_layer(i)] for i in range(config.num_layers)}}


def assemble_params(config: ModelConfig, tensors: Mapping[str, np.ndarray], source: str):
    """Build the params pytree from host arrays keyed by "/"-joined param path.

    tensors["layers_0/attn/q_proj/kernel"] = array of shape (d, Hq*Dh), any float dtype: the
    projections one by one, as checkpoints store them; they are fused here (see layout.py). Every
    leaf is checked against `abstract_params(config)` and cast to the dtype declared there.
    Raises UserError naming the first missing, unexpected or misshapen tensor.
    """
    return fused_params(config, fuse_tensors(config, tensors, source), source)


def fuse_tensors(config: ModelConfig, tensors: Mapping[str, np.ndarray], source: str) -> dict:
    """The checks and the fusion of `assemble_params`, on the host: per-projection arrays ->
    {param path: numpy array} in our layout (what `fused_params` takes)."""
    expected = check_split_shapes(config, {name: value.shape for name, value in tensors.items()}, source)
    leaves = {name: np.asarray(tensors[name], dtype=spec.dtype) for name, spec in expected.items()}
    return layout.fuse(leaves, config.num_heads, config.num_kv_heads, config.head_dim)


def check_split_shapes(config: ModelConfig, shapes: Mapping[str, tuple], source: str) -> dict:
    """UserError naming the first unexpected, missing or misshapen tensor of a checkpoint in the
    per-projection layout ({param path: shape}); nothing is read. Returns the expected
    {param path: ShapeDtypeStruct} of that layout."""
    expected = layout.split_shapes(layout.flatten(abstract_params(config)), config.num_heads, config.num_kv_heads,
                                   config.head_dim)
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise UserError(f"{source}: unexpected parameter {unexpected[0]} for this model config")
    for name, spec in expected.items():
        if name not in shapes:
            raise UserError(f"{source}: missing parameter {name}")
        if tuple(shapes[name]) != tuple(spec.shape):
            raise UserError(f"{source}: parameter {name} has shape {tuple(shapes[name])}, expected {tuple(spec.shape)}")
    return expected


def fused_params(config: ModelConfig, leaves: Mapping[str, np.ndarray], source: str):
    """The params pytree from host arrays already in our layout ({param path: array}, e.g. a
    conversion cache of `fuse_tensors`' output), checked against `abstract_params(config)`."""
    expected = layout.flatten(abstract_params(config))
    for name in sorted(set(leaves) ^ set(expected)):
        raise UserError(f"{source}: {'unexpected' if name in leaves else 'missing'} parameter {name}")
    placed = {}
    for name, spec in expected.items():
        value = leaves[name]
        if tuple(value.shape) != tuple(spec.shape):
            raise UserError(f"{source}: parameter {name} has shape {tuple(value.shape)}, expected {tuple(spec.shape)}")
        # device_put, not jnp.asarray: a plain transfer (jnp.asarray binds a conversion primitive
        # per leaf, ~2.6 s of eager dispatch for SmolLM2 on a loaded 2-core machine).
        placed[name] = jax.device_put(np.ascontiguousarray(np.asarray(value, dtype=spec.dtype)))
    return jax.tree_util.tree_map_with_path(lambda path, _: placed["/".join(k.key for k in path)],
                                            abstract_params(config))


def _write_params(directory: Path, params) -> None:
    with _checkpointer() as checkpointer:
        checkpointer.save(directory, params)
        checkpointer.wait_until_finished()


def _checkpointer():
    import orbax.checkpoint as ocp  # imported lazily: orbax is slow to import

    return ocp.StandardCheckpointer()


def save_checkpoint(path: str | os.PathLike, config: ModelConfig, params) -> None:
    """Write `params` and `config` to directory `path`.

    Written into a temporary directory next to `path`, then renamed into place, so an interrupted
    write never leaves a directory at `path` (an old checkpoint there is replaced only at the end).
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_params(tmp / _PARAMS_DIR, params)
        (tmp / _CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=1))
        if path.exists():  # replace: move the old one aside first, delete it after the rename
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "checkpoint")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / _CONFIG_FILE).is_file() and (path / _PARAMS_DIR).is_dir()


def read_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    try:
        fields = json.loads((path / _CONFIG_FILE).read_text())
        return ModelConfig(**fields)
    except FileNotFoundError:
        raise UserError(f"not a jetspec checkpoint (no {_CONFIG_FILE}): {path}") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"bad checkpoint config {path / _CONFIG_FILE}: {e}") from None


def load_checkpoint(path: str | os.PathLike, dtype: str | None = None):
    """-> (ModelConfig, params). `dtype` (optional) casts the params to another dtype after restore."""
    path = Path(path).absolute()
    if not is_checkpoint(path):
        raise UserError(f"not a complete jetspec checkpoint: {path}")
    config = read_config(path)
    try:
        with _checkpointer() as checkpointer:
            params = checkpointer.restore(path / _PARAMS_DIR, abstract_params(config))
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"cannot restore checkpoint {path} (corrupt or incomplete?): {str(e).splitlines()[0]}") from None
    if dtype is not None and dtype != config.dtype:
        config = config.replace(dtype=dtype)
        params = jax.tree_util.tree_map(lambda x, s: x.astype(s.dtype), params, abstract_params(config))
    return config, params
