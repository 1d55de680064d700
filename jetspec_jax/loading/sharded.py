"""Load a Hugging Face directory straight into a device mesh: every device reads only its shard.

    config, params = load_hf_dir_sharded("path/to/Qwen3-8B", "bfloat16", make_mesh("tp=8"))

The result is bitwise `shard_params(load_hf_dir(path, dtype)[1], ...)`: the same values in the
same shardings (`sharding.param_shardings` for this config and mesh), built without a host copy
of the model and without a funnel through device 0. Each parameter leaf is made with
`jax.make_array_from_callback`; its callback receives one device's index (a slice per axis of the
fused leaf) and reads just those bytes with safetensors' lazy `get_slice(name)[...]`:

    plain tensor (norms, embedding)   the slice itself
    Linear kernel (in, out)           torch rows = the out-range, columns = the in-range, transposed
    qkv_proj (d, Hkv, G+2, Dh)        for KV groups j0..j1: q rows j0*G*Dh..j1*G*Dh, k and v rows
                                      j0*Dh..j1*Dh (each only if the G+2 slice asks for it), fused
    gate_up_proj (d, 2, F)            gate and up rows of the F-range, columns of the d-range
    experts (E, d, 2, F), (E, F, d)   the same per expert in the E-range, from one tensor per
                                      expert or from the fused 3D tensors (see hf.py)

dtype conversion (e.g. bfloat16 files -> float32) happens per shard. A slice that cuts inside a
head's G+2 or Dh axes reads the whole heads and cuts after (param_shardings never makes one).
Devices holding the same index (replicated leaves, the dp axis) share one read, so every byte of
the files is read once per process. Host memory holds the shards of one leaf at a time (JAX
gathers a leaf's per-device pieces before one batched transfer), and a file is opened (mapped)
only while one leaf is built, so its mapped pages do not accumulate either.

Only HF safetensors directories take this path: GGUF files (dequantized whole) and our orbax
checkpoints keep `load_gguf` / `load_checkpoint`, and `Runner` places their params afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from jetspec_jax import layout
from jetspec_jax.errors import UserError
from jetspec_jax.loading.checkpoint import abstract_params, check_split_shapes
from jetspec_jax.loading.hf import _read_json, _shard_files, check_experts, checkpoint_tensors, hf_config, reading
from jetspec_jax.sharding import as_mesh, check_mesh_fits, param_shardings
from jetspec_jax.step import DecodeConfig


def _read_slice(handle, name: str, index: tuple) -> np.ndarray:
    """The one place file bytes are read: `index` (slices) of tensor `name`, nothing else."""
    return handle.get_slice(name)[index]


class _Files:
    """safetensors files opened on first use and closed together (after one leaf)."""

    def __init__(self):
        self._open = {}

    def get(self, file: Path):
        if file not in self._open:
            with reading(file):
                self._open[file] = safe_open(os.fspath(file), framework="numpy").__enter__()
        return self._open[file]

    def close(self):
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()


class _Tensor:
    """One file tensor seen in our per-projection layout: transposed (torch Linear (out, in) ->
    kernel (in, out)) and/or a window of rows (one half of a fused expert gate_up tensor)."""

    def __init__(self, file: Path, name: str, file_shape, transpose: bool, rows: tuple[int, int] | None = None):
        self.file, self.name, self.transpose = file, name, transpose
        shape = list(file_shape)
        self.row_offset = 0
        if rows is not None:
            self.row_offset, shape[-2] = rows
        if transpose:
            shape[-2], shape[-1] = shape[-1], shape[-2]
        self.shape = tuple(shape)

    def read(self, files: _Files, index: tuple) -> np.ndarray:
        if self.transpose:
            index = (*index[:-2], index[-1], index[-2])
        if self.row_offset:
            r = index[-2]
            index = (*index[:-2], slice(r.start + self.row_offset, r.stop + self.row_offset), index[-1])
        try:
            x = _read_slice(files.get(self.file), self.name, index)
        except SafetensorError as e:
            raise UserError(f"cannot read {self.name} from {self.file} (truncated or corrupt?): {e}") from None
        return np.swapaxes(x, -1, -2) if self.transpose else x


class _Stack:
    """Experts stacked on a new leading axis, read only for the requested expert range."""

    def __init__(self, parts: list[_Tensor]):
        self.parts = parts
        self.shape = (len(parts), *parts[0].shape)

    def read(self, files: _Files, index: tuple) -> np.ndarray:
        e = index[0]
        return np.stack([self.parts[i].read(files, index[1:]) for i in range(e.start, e.stop)])


def _sources(files: list[Path], config) -> dict:
    """{per-projection param path (as assemble_params names them): _Tensor | _Stack}."""
    sources, experts = {}, {}
    for file, f, name, target, expert in checkpoint_tensors(files, config, "numpy"):
        with reading(file):
            shape = tuple(f.get_slice(name).get_shape())
        if target.endswith("experts/gate_up_proj") and len(shape) == 3:  # fused (E, 2F, d)
            half = shape[1] // 2
            prefix = target[: -len("gate_up_proj")]
            sources[prefix + "gate_proj"] = _Tensor(file, name, shape, True, rows=(0, half))
            sources[prefix + "up_proj"] = _Tensor(file, name, shape, True, rows=(half, shape[1] - half))
            continue
        tensor = _Tensor(file, name, shape, transpose=target.endswith(("/kernel", "_proj")))
        if expert is None:
            sources[target] = tensor
        else:
            experts[(target, expert)] = tensor
    check_experts(experts, config)
    for target in sorted({t for t, _ in experts}):
        parts = [experts[(target, e)] for e in range(config.num_experts)]
        if len({p.shape for p in parts}) > 1:
            raise UserError(f"{target}: experts of different shapes in the checkpoint")
        sources[target] = _Stack(parts)
    return sources


def _read_qkv(sources: dict, prefix: str, leaf: str, files: _Files, index: tuple, g: int, dh: int) -> np.ndarray:
    """A slice (..., KV groups, G+2, Dh) of the fused qkv kernel/bias from its q, k, v rows."""
    *lead, groups, part, dims = index
    j0, j1 = groups.start, groups.stop
    pieces = []
    for proj, start, count in (("q_proj", 0, g), ("k_proj", g, 1), ("v_proj", g + 1, 1)):
        lo, hi = max(part.start, start), min(part.stop, start + count)
        if lo >= hi:
            continue
        rows = slice(j0 * count * dh, j1 * count * dh)  # group j holds heads j*count.. of this projection
        x = sources[f"{prefix}{proj}/{leaf}"].read(files, (*lead, rows))
        x = x.reshape(*x.shape[:-1], j1 - j0, count, dh)
        pieces.append(x[..., lo - start: hi - start, :])
    return np.concatenate(pieces, axis=-2)[..., dims]


def _read_leaf(name: str, sources: dict, files: _Files, index: tuple, config) -> np.ndarray:
    """One shard (normalized slices `index`) of fused leaf `name`, in the files' dtype."""
    if name in sources:
        return sources[name].read(files, index)
    if "qkv_proj/" in name:
        prefix, leaf = name.rsplit("qkv_proj/", 1)
        return _read_qkv(sources, prefix, leaf, files, index, config.num_heads // config.num_kv_heads,
                         config.head_dim)
    if name.endswith("gate_up_proj/kernel"):
        parts = [name[: -len("gate_up_proj/kernel")] + p for p in ("gate_proj/kernel", "up_proj/kernel")]
    elif name.endswith("experts/gate_up_proj"):
        parts = [name[: -len("gate_up_proj")] + p for p in ("gate_proj", "up_proj")]
    else:
        raise UserError(f"no source for parameter {name}")
    *lead, which, cols = index
    return np.stack([sources[parts[c]].read(files, (*lead, cols)) for c in range(which.start, which.stop)], axis=-2)


def _leaf_shard(name: str, sources: dict, files: _Files, index: tuple, config, dtype) -> np.ndarray:
    """What one device's callback returns: its shard, cast to the param dtype."""
    return np.ascontiguousarray(_read_leaf(name, sources, files, index, config), dtype=dtype)


def _build_leaf(name: str, spec, sharding, sources: dict, config) -> jax.Array:
    files, shards = _Files(), {}

    def callback(index):
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, spec.shape))
        key = tuple((s.start, s.stop) for s in index)
        if key not in shards:  # devices with the same index (replicas) share one read
            shards[key] = _leaf_shard(name, sources, files, index, config, spec.dtype)
        return shards[key]

    try:
        return jax.make_array_from_callback(tuple(spec.shape), sharding, callback)
    finally:
        files.close()


def load_hf_dir_sharded(path: str | os.PathLike, dtype: str = "float32", mesh=None):
    """-> (ModelConfig, params) with every leaf already in its mesh sharding (see the module
    docstring). `mesh`: a `jax.sharding.Mesh` or a spec such as "dp=2,tp=4". Raises UserError on
    anything unusable, including a mesh the model does not fit (`check_mesh_fits`)."""
    mesh = as_mesh(mesh)
    if mesh is None:
        raise ValueError("load_hf_dir_sharded needs a mesh (use load_hf_dir without one)")
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory not found: {path}")
    config = hf_config(_read_json(path / "config.json"), dtype)
    check_mesh_fits(config, None, mesh)
    sources = _sources(_shard_files(path), config)
    abstract = abstract_params(config)
    flat = layout.flatten(abstract)
    check_split_shapes(config, {name: src.shape for name, src in sources.items()}, os.fspath(path))
    shardings = layout.flatten(param_shardings({"target": abstract}, DecodeConfig(target=config), mesh)["target"])
    leaves = {name: _build_leaf(name, spec, shardings[name], sources, config) for name, spec in flat.items()}
    return config, jax.tree_util.tree_map_with_path(lambda p, _: leaves["/".join(k.key for k in p)], abstract)
