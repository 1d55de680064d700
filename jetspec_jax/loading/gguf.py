"""Read a GGUF file (llama.cpp's format) into our config and params pytree.

    config, params, metadata = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "float32")

`read_gguf` parses the file itself (the format is a short header of key/values and tensor
descriptions, then aligned tensor data, memory-mapped here): `gguf.GGUFReader` builds one numpy
view per vocabulary string and took 2 s (SmolLM2, 49k tokens) to 17 s (Qwen2, 152k tokens and
merges) just to open a file. Every tensor is dequantized to float32 on the host with
`gguf.quants.dequantize`, then cast to the dtype our model declares for that parameter.
Supported architectures: `llama` (Llama, SmolLM2), `qwen2` (Qwen2/2.5: q/k/v biases) and
`qwen3` (per-head q/k RMSNorm).

Two layout facts matter:
- GGUF tensors are stored in torch Linear layout (out, in); our Dense kernels are (in, out).
- llama.cpp's converter permutes the rows of `llama` q/k projections, within each head, for
  interleaved ("GPT-J") RoPE. Our RoPE is HF's "rotate half", so we undo it (see `_unpermute`).
  qwen2/qwen3 GGUFs are written without that permutation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
import sys
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

from jetspec_jax.config import ModelConfig
from jetspec_jax.errors import UserError
from jetspec_jax.loading.checkpoint import fuse_tensors, fused_params

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")

# Per-layer GGUF tensor name -> our param path under `layers_{i}/`.
_LAYER_TENSORS = {
    "attn_norm.weight": "input_norm/scale",
    "ffn_norm.weight": "post_attn_norm/scale",
    "attn_q.weight": "attn/q_proj/kernel",
    "attn_k.weight": "attn/k_proj/kernel",
    "attn_v.weight": "attn/v_proj/kernel",
    "attn_output.weight": "attn/o_proj/kernel",
    "attn_q.bias": "attn/q_proj/bias",
    "attn_k.bias": "attn/k_proj/bias",
    "attn_v.bias": "attn/v_proj/bias",
    "attn_q_norm.weight": "attn/q_norm/scale",
    "attn_k_norm.weight": "attn/k_norm/scale",
    "ffn_gate.weight": "mlp/gate_proj/kernel",
    "ffn_up.weight": "mlp/up_proj/kernel",
    "ffn_down.weight": "mlp/down_proj/kernel",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "embed/embedding",
    "output_norm.weight": "final_norm/scale",
    "output.weight": "lm_head/kernel",
}
# Show a progress bar when dequantizing files larger than this.
_PROGRESS_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (outermost first): (out, in) for a weight matrix
    data: np.ndarray  # raw bytes (uint8), a view of the memory-mapped file


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    metadata: dict[str, Any]  # every key/value pair, as plain Python values
    tensors: tuple[GGUFTensor, ...]


# GGUF value type -> (struct code, numpy dtype) for fixed-size scalars.
_SCALARS = {
    gguf.GGUFValueType.UINT8: ("B", np.uint8), gguf.GGUFValueType.INT8: ("b", np.int8),
    gguf.GGUFValueType.UINT16: ("H", np.uint16), gguf.GGUFValueType.INT16: ("h", np.int16),
    gguf.GGUFValueType.UINT32: ("I", np.uint32), gguf.GGUFValueType.INT32: ("i", np.int32),
    gguf.GGUFValueType.FLOAT32: ("f", np.float32), gguf.GGUFValueType.BOOL: ("?", np.bool_),
    gguf.GGUFValueType.UINT64: ("Q", np.uint64), gguf.GGUFValueType.INT64: ("q", np.int64),
    gguf.GGUFValueType.FLOAT64: ("d", np.float64),
}


class _Cursor:
    """Little-endian reads from a buffer. gguf.GGUFReader builds a numpy view per string, which
    takes seconds to tens of seconds for a 150k-token vocabulary; this reads them directly."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def scalar(self, code: str):
        (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += struct.calcsize(code)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        kind = gguf.GGUFValueType(kind)
        if kind == gguf.GGUFValueType.STRING:
            return self.string()
        if kind == gguf.GGUFValueType.ARRAY:
            item, count = gguf.GGUFValueType(self.scalar("I")), self.scalar("Q")
            if item in _SCALARS:
                dtype = np.dtype(_SCALARS[item][1]).newbyteorder("<")
                values = np.frombuffer(self.buf, dtype, count, self.pos)
                self.pos += count * dtype.itemsize
                return values.tolist()
            return [self.value(item) for _ in range(count)]
        return self.scalar(_SCALARS[kind][0])


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file (v2/v3, little-endian); tensor data stays memory-mapped.

    A missing, truncated or corrupt file is a `UserError`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise UserError(f"GGUF file {path} is empty") from None
    cur = _Cursor(buf)
    try:
        if cur.scalar("I") != gguf.GGUF_MAGIC:
            raise UserError(f"not a GGUF file (bad magic): {path}")
        version = cur.scalar("I")
        if version not in (2, 3):
            raise UserError(f"unsupported GGUF version {version} in {path}")
        n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("Q") for _ in range(cur.scalar("I"))]
            infos.append((name, gguf.GGMLQuantizationType(cur.scalar("I")), dims, cur.scalar("Q")))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read GGUF file {path} (truncated or corrupt?): {e}") from None
    alignment = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, kind, dims, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
        row_bytes = dims[0] // block * type_size
        n_bytes = row_bytes * int(np.prod(dims[1:], dtype=np.int64))
        start = data_start + offset
        if start + n_bytes > len(buf):
            raise UserError(f"GGUF file {path} is truncated: tensor {name} ends past the end of the file")
        data = np.frombuffer(buf, np.uint8, n_bytes, start).reshape(*reversed(dims[1:]), row_bytes)
        tensors.append(GGUFTensor(name, kind, tuple(int(d) for d in reversed(dims)), data))
    return GGUFFile(metadata, tuple(tensors))


def gguf_config(metadata: dict[str, Any], dtype: str = "float32") -> ModelConfig:
    """The ModelConfig a GGUF's metadata describes."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UserError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")

    def get(key, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise UserError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise UserError("GGUF with different key and value head sizes is not supported")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise UserError("GGUF with partial rotary embeddings is not supported")
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or float(metadata.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0) != 1.0:
        raise UserError(f"unsupported rope scaling {scaling!r} in GGUF (only unscaled RoPE is implemented)")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = int(metadata.get(f"{arch}.vocab_size") or (len(tokens) if tokens else 0))
    if not vocab:
        raise UserError("GGUF metadata gives no vocabulary size")
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        qk_norm=arch == "qwen3",
        qkv_bias=arch == "qwen2",
        tie_embeddings=False,  # decided by the presence of output.weight in load_gguf
        max_position_embeddings=int(get("context_length")),
        dtype=dtype,
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of a q/k weight (rows, cols) or bias (rows,).

    Within each head llama.cpp stores rows as [0, h, 1, h+1, ...] (h = head_dim/2), pairing
    the two halves that HF's rotate-half RoPE rotates together; this puts them back as
    [0, 1, ..., h-1, h, ..., 2h-1].
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _param_path(name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"layers_{parts[1]}/{_LAYER_TENSORS[parts[2]]}"
    return None


# Bump when the dequantized tensors of a GGUF file would change (a loader fix): old caches are ignored.
# 2: the tensors are stored fused, in our layout (fuse_tensors); 3: every tensor 64-byte aligned.
_CONVERSION_VERSION = "3"
# XLA:CPU takes a host buffer without copying it when its address is a multiple of this.
_ALIGN = 64


def _converted_path(path: str) -> str:
    return f"{path}.jetspec-f32.safetensors"


def _conversion_key(path: str) -> dict:
    st = os.stat(path)
    return {"source_size": str(st.st_size), "source_mtime_ns": str(st.st_mtime_ns), "version": _CONVERSION_VERSION}


def _read_converted(path: str):
    """The dequantized float32 tensors cached next to the GGUF file, already fused into our layout
    ({param path: array}), or None if absent, stale or damaged.

    The file is memory-mapped, not read: `jax.device_put` of a 64-byte aligned float32 view takes
    it as the device buffer on CPU without a copy (the pages come from the page cache as they are
    touched). A fresh 0.5 GB copy cost ~1.2 s of page faults here; mapping it costs milliseconds.
    The mapping is copy-on-write: whatever writes to the arrays (a donated buffer) never reaches the
    file, and replacing the file (`_write_converted` renames) leaves mapped arrays intact.
    """
    cached = _converted_path(path)
    try:
        mapped = np.memmap(cached, np.uint8, "c")
        n = int(mapped[:8].view("<u8")[0])
        header = json.loads(bytes(mapped[8: 8 + n]))
        if header.pop("__metadata__", None) != _conversion_key(path):
            return None
        start, tensors = 8 + n, {}
        for name, info in header.items():
            lo, hi = info["data_offsets"]
            shape = tuple(info["shape"])
            if info["dtype"] != "F32" or not 0 <= lo <= hi <= len(mapped) - start or hi - lo != 4 * math.prod(shape):
                return None
            tensors[name] = mapped[start + lo: start + hi].view("<f4").reshape(shape)
        return tensors
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None  # missing, truncated or unreadable: convert again (and overwrite it)


def _write_converted(path: str, tensors: dict) -> None:
    """Cache the dequantized tensors next to the GGUF as safetensors (atomically), each tensor's
    data at a multiple of 64 bytes from the start of the file (see `_read_converted`); a folder
    that cannot be written only means the next run converts again.

    Written here rather than with `safetensors.numpy.save_file`, whose layout leaves the alignment
    to chance: the format (8-byte header length, JSON header, contiguous data) allows padding the
    header with spaces. Tensors whose size is not a multiple of 64 bytes go last (the first of them
    is still aligned; a misaligned one is copied when loaded, nothing worse).
    """
    arrays = {k: np.ascontiguousarray(v, dtype="<f4") for k, v in tensors.items()}
    order = sorted(arrays, key=lambda k: (arrays[k].nbytes % _ALIGN != 0, k))
    header, offset = {"__metadata__": _conversion_key(path)}, 0
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    cached = _converted_path(path)
    tmp = f"{cached}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in order:
                f.write(memoryview(arrays[name]).cast("B"))
        os.replace(tmp, cached)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_gguf(path: str | os.PathLike, dtype: str = "float32", cache: bool = True):
    """-> (ModelConfig, params, metadata). Raises UserError on a bad or unsupported file.

    Dequantizing takes seconds, so the float32 tensors are cached once as
    `<file>.jetspec-f32.safetensors` next to it (keyed by the file's size and mtime) and read
    from there by later loads; `cache=False` neither reads nor writes it.
    """
    file = read_gguf(path)
    config = gguf_config(file.metadata, dtype)
    config = config.replace(tie_embeddings="output.weight" not in {t.name for t in file.tensors})
    converted = _read_converted(os.fspath(path)) if cache else None
    if converted is not None:
        return config, fused_params(config, converted, source=os.fspath(path)), file.metadata
    permuted = file.metadata["general.architecture"] == "llama"

    tensors = {}
    total = sum(t.data.size for t in file.tensors)
    bar = tqdm(file.tensors, desc=f"dequantizing {os.path.basename(os.fspath(path))}", unit="tensor",
               file=sys.stderr, disable=total < _PROGRESS_BYTES, leave=False)
    for t in bar:
        target = _param_path(t.name)
        if target is None:
            if t.name.startswith("rope_"):  # precomputed RoPE factors some converters add; unused
                continue
            raise UserError(f"unexpected tensor {t.name!r} in GGUF file {path}")
        try:
            w = gguf.quants.dequantize(t.data, t.type)
        except NotImplementedError:
            raise UserError(f"GGUF tensor {t.name} has unsupported type {t.type.name}") from None
        w = np.asarray(w, np.float32).reshape(t.shape)  # (out, in)
        if permuted and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute(w, config.num_heads)
        elif permuted and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _unpermute(w, config.num_kv_heads)
        tensors[target] = w.T if target.endswith("/kernel") else w
    # Fused in float32 whatever `dtype` is: the cache serves float32 and bfloat16 loads alike.
    fused = fuse_tensors(config.replace(dtype="float32"), tensors, source=os.fspath(path))
    params = fused_params(config, fused, source=os.fspath(path))
    if cache:
        _write_converted(os.fspath(path), fused)
    return config, params, file.metadata
