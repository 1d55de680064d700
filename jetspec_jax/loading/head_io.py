"""Load and save draft heads in the Hugging Face format of JetSpec / DFlash heads.

A head directory holds `config.json` (a Qwen3Config plus `num_target_layers`, `block_size` and
`dflash_config`) and `model.safetensors` (or shards listed in `model.safetensors.index.json`)
with torch names:

    fc.weight  hidden_norm.weight  norm.weight
    layers.{i}.input_layernorm.weight  layers.{i}.post_attention_layernorm.weight
    layers.{i}.self_attn.{q,k,v,o}_proj.weight (+ .bias with attention_bias)
    layers.{i}.self_attn.{q,k}_norm.weight  layers.{i}.mlp.{gate,up,down}_proj.weight

Torch Linear weights are (out, in); Flax kernels are (in, out).

Causal flag: JetSpec heads say `dflash_config.causal_head`; the `dflash` package (0.1.0) reads a
top-level `is_causal` instead (absent means bidirectional), and vLLM reads `dflash_config.causal`
(what NeMo's JetSpec exporter stamps). We accept any of the three; those present must agree, since
the readers would otherwise run different heads (UserError). None present -> bidirectional, as
`dflash` does. `save_head_dir` writes `causal_head` and `is_causal`.

Draft values (`mask_token_id`, `target_layer_ids`, `block_size`, ...) are read from `dflash_config`
first, then from the top level, as the `dflash` package reads them: published heads use both
spellings (DFlash / JetSpec: `block_size` at the top level, the rest nested; DFlash2: all nested;
some community heads: all at the top level).

Config keys of variants this head does not compute are refused (one-line UserError), never
ignored: DFlash2, sliding windows (`layer_types`, `use_swa`), attention sinks, partial rotary,
JetSpec's hidden-size adapter (`target_hidden_size` != `hidden_size`), logit scaling / softcapping.

Tensors other than the head's are refused (a different architecture, e.g. DFlash2, would
otherwise load silently wrong), except rotary `inv_freq` buffers that older exports carry.

A reduced-vocabulary head (`draft_vocab_size: K` in config.json) also stores `d2t`, (K,) integer
target ids: the head's logits cover those ids only. It must list K distinct ids inside the target's
vocabulary (else a one-line UserError). Heads without it draft over the full vocabulary.

A head directory may also hold `ngrams.safetensors`, the answer n-gram table of its target
(`jetspec_jax/ngrams.py`: keys, next, orders); it loads into params["ngram_keys"] / ["ngram_next"]
and HeadConfig.ngram_orders, and is checked on load (sorted keys, ids inside the vocabulary, equal
lengths; else a one-line UserError). Other readers (`dflash`) ignore the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.flax import save_file

from jetspec_jax import layout, ngrams
from jetspec_jax.errors import UserError
from jetspec_jax.head import HeadConfig, check_draft_vocab, init_head_params
from jetspec_jax.loading.hf import rope_theta

CONFIG_FILE = "config.json"
# Draft vocabulary of a reduced-vocabulary head: (K,) absolute target ids, draft id i -> d2t[i]
# (EAGLE-3 names the same table d2t but stores offsets d2t[i] - i).
D2T = "d2t"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "intermediate_size", "vocab_size", "num_target_layers")
# Flax module names -> torch module names (everything else is the same).
_MODULE_NAMES = {"attn": "self_attn", "input_norm": "input_layernorm",
                 "post_attn_norm": "post_attention_layernorm"}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------

def _draft_value(raw: dict, name: str, default=None):
    """`dflash_config.name`, else top-level `name` (the lookup order of the dflash package)."""
    return (raw.get("dflash_config") or {}).get(name, raw.get(name, default))


def _causal_flag(raw: dict) -> bool:
    nested = raw.get("dflash_config") or {}
    flags = {}
    for name in ("causal_head", "causal"):  # read like every draft value: nested, else top level
        if nested.get(name) is not None:
            flags[f"dflash_config.{name}"] = nested[name]
        elif raw.get(name) is not None:
            flags[name] = raw[name]
    if raw.get("is_causal") is not None:
        flags["is_causal"] = raw["is_causal"]
    if not flags:
        return False
    (first, value), *others = flags.items()
    for name, other in others:
        if bool(other) != bool(value):
            raise UserError(f"{first}={value} disagrees with {name}={other}")
    return bool(value)


def _reject_unsupported(raw: dict) -> None:
    """Refuse DFlash variants whose arithmetic this head does not implement."""
    if "DFlash2DraftModel" in (raw.get("architectures") or []):
        raise UserError("DFlash2 heads (convolutions, candidate selector) are not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
    n = raw["num_hidden_layers"]
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if raw.get("use_sliding_window") and i >= raw.get("max_window_layers", 28)
        else "full_attention" for i in range(n)
    ]
    if any(t != "full_attention" for t in layer_types):
        raise UserError("sliding-window attention layers are not supported in draft heads")
    if _draft_value(raw, "use_swa"):
        raise UserError("sliding-window attention layers are not supported in draft heads (use_swa)")
    if _draft_value(raw, "attention_sink_bias"):
        raise UserError("attention sinks (attention_sink_bias) are not supported in draft heads")
    rotary = (raw.get("rope_parameters") or {}).get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if rotary is not None and float(rotary) != 1.0:
        raise UserError(f"partial_rotary_factor={rotary} is not supported (only full rotary, 1.0)")
    target_hidden = _draft_value(raw, "target_hidden_size")
    if target_hidden is not None and int(target_hidden) != int(raw["hidden_size"]):
        # JetSpec would insert a HiddenDimAdapter before fc; this head has none.
        raise UserError(f"target_hidden_size={target_hidden} differs from hidden_size={raw['hidden_size']} "
                        "(a hidden-size adapter), which is not supported")
    for name, neutral in (("input_embedding_scale", 1.0), ("output_multiplier", 1.0)):
        if float(_draft_value(raw, name, neutral)) != neutral:
            raise UserError(f"{name}={_draft_value(raw, name)} is not supported (only {neutral})")
    if float(_draft_value(raw, "final_logit_softcapping", None) or 0) > 0:
        raise UserError("final_logit_softcapping is not supported in draft heads")


def head_config_from_hf(raw: dict, dtype: str = "float32") -> HeadConfig:
    """Parsed config.json -> HeadConfig; raises UserError (one line) on anything unusable."""
    missing = [k for k in _REQUIRED if raw.get(k) is None]
    if missing:
        raise UserError(f"missing {', '.join(missing)}")
    mask_token_id = _draft_value(raw, "mask_token_id")
    if mask_token_id is None:
        raise UserError("missing dflash_config.mask_token_id")
    try:
        _reject_unsupported(raw)
        return HeadConfig(
            hidden_size=int(raw["hidden_size"]), num_layers=int(raw["num_hidden_layers"]),
            num_heads=int(raw["num_attention_heads"]), num_kv_heads=int(raw["num_key_value_heads"]),
            head_dim=int(raw["head_dim"]), intermediate_size=int(raw["intermediate_size"]),
            vocab_size=int(raw["vocab_size"]), num_target_layers=int(raw["num_target_layers"]),
            mask_token_id=int(mask_token_id), block_size=int(_draft_value(raw, "block_size", 16)),
            target_layer_ids=tuple(_draft_value(raw, "target_layer_ids", ())),
            causal=_causal_flag(raw), rope_theta=rope_theta(raw),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            qkv_bias=bool(raw.get("attention_bias", False)), dtype=dtype,
            draft_vocab_size=None if raw.get("draft_vocab_size") is None else int(raw["draft_vocab_size"]),
        )
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None


def head_config_to_hf(cfg: HeadConfig) -> dict:
    """HeadConfig -> config.json that `dflash.model.DFlashDraftModel.from_pretrained` loads."""
    return {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "attention_bias": cfg.qkv_bias,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "layer_types": ["full_attention"] * cfg.num_layers,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "dtype": cfg.dtype,
        "num_target_layers": cfg.num_target_layers,
        "block_size": cfg.block_size,
        "is_causal": cfg.causal,
        "dflash_config": {
            "target_layer_ids": list(cfg.target_layer_ids),
            "mask_token_id": cfg.mask_token_id,
            "causal_head": cfg.causal,
            "block_size": cfg.block_size,
        },
        **({} if cfg.draft_vocab_size is None else {"draft_vocab_size": cfg.draft_vocab_size}),
    }


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

def _hf_name(path: tuple[str, ...]) -> str:
    """('layers_0', 'attn', 'q_proj', 'kernel') -> 'layers.0.self_attn.q_proj.weight'."""
    *modules, leaf = path
    parts = []
    for m in modules:
        if m.startswith("layers_"):
            parts += ["layers", m[len("layers_"):]]
        else:
            parts.append(_MODULE_NAMES.get(m, m))
    return ".".join(parts + [_LEAF_NAMES[leaf]])


def _heads(cfg: HeadConfig) -> tuple:
    return cfg.num_heads, cfg.num_kv_heads, cfg.head_dim


def _param_shapes(cfg: HeadConfig) -> dict:
    """{"/"-joined path: ShapeDtypeStruct} of the head's params (fused layout); `init_head_params`
    is the one source of shapes."""
    return layout.flatten(jax.eval_shape(lambda: init_head_params(cfg, jax.random.PRNGKey(0))))


def _expected(cfg: HeadConfig) -> dict:
    """{flax path tuple: ShapeDtypeStruct} of every head parameter as checkpoints store them, one
    projection at a time (the params fuse q/k/v and gate/up, see layout.py)."""
    split = layout.split_shapes(_param_shapes(cfg), *_heads(cfg))
    return {tuple(name.split("/")): leaf for name, leaf in split.items()}


def _weight_files(path: Path) -> list[Path]:
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    if (path / INDEX_FILE).is_file():
        index = _read_json(path / INDEX_FILE)
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if not shards:
            raise UserError(f"{path / INDEX_FILE}: empty weight_map")
        return [path / s for s in shards]
    raise UserError(f"{path}: no {WEIGHTS_FILE} (or {INDEX_FILE})")


def _read_tensors(path: Path, dtype) -> dict:
    """All tensors of the head directory as {torch name: host array of `dtype`} (the draft
    vocabulary table `d2t` stays integer). Host arrays: casts, transposes and fusing on the host
    cost no compiled program each (~20 of them, ~0.2 s of a second run's start-up on CPU)."""
    tensors = {}
    for file in _weight_files(path):
        try:
            with contextlib.ExitStack() as stack:
                f, via_jax = stack.enter_context(safe_open(str(file), framework="numpy")), None
                for name in f.keys():
                    try:
                        t = f.get_tensor(name)
                    except TypeError:  # numpy has no bfloat16: that tensor through JAX, then back
                        via_jax = via_jax or stack.enter_context(safe_open(str(file), framework="flax"))
                        t = np.asarray(via_jax.get_tensor(name))
                    tensors[name] = t.astype(np.int32) if name == D2T else t.astype(dtype)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file}: unreadable safetensors ({str(e).splitlines()[0]})") from None
    return tensors


def _params_from_tensors(cfg: HeadConfig, tensors: dict, source: Path) -> dict:
    tensors = dict(tensors)
    d2t = tensors.pop(D2T, None)
    if (d2t is None) != (cfg.draft_vocab_size is None):
        raise UserError(f"{source}: config draft_vocab_size {cfg.draft_vocab_size} but "
                        f"{'no' if d2t is None else 'a'} {D2T} tensor")
    if d2t is not None:
        if not jnp.issubdtype(d2t.dtype, jnp.integer):
            raise UserError(f"{source}: {D2T} must hold integer token ids")
        check_draft_vocab(jax.device_get(d2t), cfg, str(source))
    params = _weights_from_tensors(cfg, tensors, source)
    return params if d2t is None else {**params, "d2t": d2t}


def _weights_from_tensors(cfg: HeadConfig, tensors: dict, source: Path) -> dict:
    expected = _expected(cfg)
    names = {_hf_name(p): p for p in expected}
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise UserError(f"{source}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    extra = sorted(n for n in set(tensors) - set(names) if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise UserError(f"{source}: unexpected tensors {extra[:3]}{' ...' if len(extra) > 3 else ''}")
    flat = {}
    for name, path in names.items():
        is_kernel = path[-1] == "kernel"  # torch (out, in) <-> flax (in, out)
        want = expected[path].shape[::-1] if is_kernel else expected[path].shape
        if tuple(tensors[name].shape) != tuple(want):
            raise UserError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                            f"the config implies {tuple(want)}")
        flat["/".join(path)] = tensors[name].T if is_kernel else tensors[name]
    return layout.unflatten(layout.fuse(flat, *_heads(cfg)))


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _read_json(file: Path) -> dict:
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{file}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: unreadable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{file}: expected a JSON object")
    return raw


def load_head_dir(path, dtype: str = "float32") -> tuple[HeadConfig, dict]:
    """A JetSpec / DFlash HF head directory -> (HeadConfig, params in DraftHead's layout)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a draft-head directory")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unsupported dtype {dtype!r} (float32, bfloat16 or float16)")
    raw = _read_json(path / CONFIG_FILE)
    try:
        cfg = head_config_from_hf(raw, dtype)
    except UserError as e:
        raise UserError(f"{path / CONFIG_FILE}: {e}") from None
    params = _params_from_tensors(cfg, _read_tensors(path, jnp.dtype(dtype)), path)
    table = _read_ngrams(path / ngrams.FILE, cfg.vocab_size)
    if table is not None:
        cfg = cfg.replace(ngram_orders=tuple(table["orders"].tolist()))
        params = {**params, "ngram_keys": table["keys"], "ngram_next": table["next"]}
    return cfg, jax.device_put(jax.tree.map(np.ascontiguousarray, params))


def _read_ngrams(file: Path, vocab_size: int) -> dict | None:
    """The answer n-gram table shipped with a head (ngrams.py), None without one; one-line
    UserError when it is unreadable or unusable (unsorted, ids outside the vocabulary, ...)."""
    if not file.exists():
        return None
    try:
        with safe_open(str(file), framework="numpy") as f:
            table = {name: f.get_tensor(name) for name in f.keys()}
        ngrams.check_table(table, vocab_size, str(file))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file}: unreadable safetensors ({str(e).splitlines()[0]})") from None
    except ValueError as e:
        raise UserError(str(e)) from None
    return {k: np.asarray(table[k], np.int32) for k in ("keys", "next", "orders")}


def save_ngrams(path, table: dict, vocab_size: int) -> None:
    """Write the n-gram table `table` (keys, next, orders) into the head directory `path`,
    atomically (a temporary file renamed over the old one)."""
    file = Path(path) / ngrams.FILE
    try:
        ngrams.check_table(table, vocab_size, str(file))
    except ValueError as e:
        raise UserError(str(e)) from None
    tmp = file.with_name(f".{file.name}.tmp")
    save_file({k: np.ascontiguousarray(np.asarray(table[k], np.int32)) for k in ("keys", "next", "orders")},
              str(tmp))
    os.replace(tmp, file)


def _write(directory: Path, cfg: HeadConfig, params: dict) -> None:
    params = dict(params)
    table = {"keys": params.pop("ngram_keys", None), "next": params.pop("ngram_next", None),
             "orders": np.array(cfg.ngram_orders, np.int32)}
    if (table["keys"] is None) != (not cfg.ngram_orders):
        raise ValueError("a head with ngram_orders needs params['ngram_keys'] and only such a head has one")
    if cfg.ngram_orders:
        save_ngrams(directory, jax.device_get(table), cfg.vocab_size)
        cfg = cfg.replace(ngram_orders=())
    d2t = params.pop("d2t", None)
    if (d2t is None) != (cfg.draft_vocab_size is None):
        raise ValueError("a reduced-vocabulary head needs params['d2t'] and only such a head has one")
    fused = layout.flatten(params)
    if {p: v.shape for p, v in fused.items()} != {p: v.shape for p, v in _param_shapes(cfg).items()}:
        raise ValueError("params do not match the head config (names or shapes differ)")
    got = {tuple(name.split("/")): leaf for name, leaf in layout.split(fused, *_heads(cfg)).items()}
    tensors = {_hf_name(p): (v.T if p[-1] == "kernel" else jnp.asarray(v)) for p, v in got.items()}
    if d2t is not None:
        tensors[D2T] = jnp.asarray(d2t, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(head_config_to_hf(cfg), indent=2) + "\n")


def save_head_dir(path, cfg: HeadConfig, params: dict, *, overwrite: bool = False) -> None:
    """Write `path/` (config.json + model.safetensors) in the HF format `load_head_dir` and
    `dflash` read. The files are written to a temporary sibling directory that is then renamed,
    so `path` never holds a half-written head. An existing `path` is replaced only if `overwrite`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write(tmp, cfg, params)
        os.chmod(tmp, 0o755)
        if path.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
