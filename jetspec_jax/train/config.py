"""The training config: one YAML file, four sections, every key known.

    cfg = read_config("configs/smollm2-135m-causal.yaml")

    target: smollm2-135m            # registered name, HF directory or .gguf (the frozen target)
    data:   {dir, prompt_sets, max_new_tokens, batch_size, temperature, seed, limit,
             max_prompt_tokens}
    head:   {num_layers, block_size, causal, mask_token_id, ...}  (unset shapes come from the target)
    train:  {output_dir, steps, batch_size, max_length, anchors_per_seq, loss, lr, ...}
    features: {dir, taps, top_k, max_length, limit, ...}  (optional: train reads this cache)

A config may start from another: `base: smollm2-135m-causal.yaml` (relative to the config's own
folder) reads that file first, then this file's keys replace the base's one by one inside each
section. Stages and ablations name only what differs.

An unknown key, a missing required key or a value of the wrong type is a one-line UserError
naming the file and the key. Relative paths inside a config are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from jetspec_jax.errors import UserError
from jetspec_jax.prompts import check_training_sets
from jetspec_jax.train.objective import block_rows_fit

SECTIONS = ("data", "head", "train", "features")
OPTIONAL_SECTIONS = ("features",)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Regeneration: the target answers the training prompts under its chat template."""

    dir: str
    prompt_sets: tuple[str, ...] = ("gsm8k", "mbpp")
    max_new_tokens: int = 512
    batch_size: int = 16
    temperature: float = 0.0  # 0: greedy
    seed: int = 0
    limit: int | None = None  # only the first `limit` prompts of each set (smoke runs)
    max_prompt_tokens: int = 512  # longer chat prompts are skipped: they would size every row's cache


@dataclasses.dataclass(frozen=True)
class HeadSection:
    """Draft-head shape. None means "the target's value" (hidden size always is the target's)."""

    num_layers: int
    mask_token_id: int
    block_size: int = 16
    causal: bool = True
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    target_layer_ids: tuple[int, ...] | None = None  # None: trainer.training_taps (5 layers, low to late)
    draft_vocab_size: int | None = None  # K: draft over the K most frequent answer tokens; None: all
    rope_theta: float | None = None
    rms_norm_eps: float | None = None


@dataclasses.dataclass(frozen=True)
class TrainSection:
    output_dir: str
    steps: int
    batch_size: int = 4  # sequences per step
    max_length: int = 1024  # longer sequences are cut (prompt + start of the response kept)
    anchors_per_seq: int = 64
    block_rows: int | None = None  # rows of each anchor block trained (causal heads); None: head.block_size
    loss: str = "ce"  # "ce": hard labels x_{a+k}; "kl": forward KL to the target at T = 1
    init_from: str | None = None  # a head directory to start from (e.g. a shipped head); None: random init
    loss_decay_gamma: float | None = None  # depth k weighs exp(-(k-1)/gamma) (DFlash: 7 for blocks of 16); None: equal
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    vocab_chunk: int = 512  # rows per chunk of the vocabulary projection in the loss
    val_every: int = 200  # steps between validation runs (with a feature cache; also at the end)


@dataclasses.dataclass(frozen=True)
class FeaturesSection:
    """The feature cache (train/features.py): the frozen target's taps and top-k log-probs."""

    dir: str
    taps: tuple[int, ...]  # every layer any head trained from this cache may read
    top_k: int = 8  # next-token log-probs kept per position (soft labels)
    max_length: int = 768  # positions cached per sequence (train.max_length may not exceed it)
    limit: int | None = None  # cache at most this many sequences (validation split first)
    first_sets: tuple[str, ...] = ()  # prompt sets cached right after the validation split (new answers first)
    shard_size: int = 128  # sequences per shard (a killed build loses at most one shard)
    batch_size: int = 4  # sequences per target forward


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    target: str
    data: DataConfig
    head: HeadSection
    train: TrainSection
    features: FeaturesSection | None = None
    path: str = ""  # the YAML file it came from (for messages)


def _coerce(value, kind, where: str):
    """Check a YAML value against a field type (int, float, bool, str, tuple[...], X | None)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if args and type(None) in args:  # X | None
        return None if value is None else _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin is tuple:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list")
        return tuple(_coerce(v, args[0], where) for v in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def _section(cls, raw, where: str):
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "path"}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING:
                raise UserError(f"{where}.{name}: missing required key")
            continue
        values[name] = _coerce(raw[name], hints[name], f"{where}.{name}")
    return cls(**values)


def parse_config(raw, path: str = "<config>") -> TrainConfig:
    """A parsed YAML mapping -> TrainConfig (validated)."""
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a YAML mapping at the top level")
    unknown = sorted(set(raw) - {"target", *SECTIONS})
    if unknown:
        raise UserError(f"{path}: {unknown[0]}: unknown key (known: {', '.join(('target',) + SECTIONS)})")
    for key in ("target",) + SECTIONS:
        if key not in raw and key not in OPTIONAL_SECTIONS:
            raise UserError(f"{path}: {key}: missing required key")
    cfg = TrainConfig(
        target=_coerce(raw["target"], str, f"{path}: target"),
        data=_section(DataConfig, raw["data"], f"{path}: data"),
        head=_section(HeadSection, raw["head"], f"{path}: head"),
        train=_section(TrainSection, raw["train"], f"{path}: train"),
        features=None if raw.get("features") is None else _section(FeaturesSection, raw["features"], f"{path}: features"),
        path=path,
    )
    _validate(cfg)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    t, where = cfg.train, cfg.path
    if t.loss not in ("ce", "kl"):
        raise UserError(f"{where}: train.loss must be 'ce' or 'kl', got {t.loss!r}")
    for name in ("steps", "batch_size", "anchors_per_seq", "checkpoint_every", "keep_checkpoints", "vocab_chunk"):
        if getattr(t, name) < 1:
            raise UserError(f"{where}: train.{name} must be >= 1")
    if t.loss_decay_gamma is not None and not t.loss_decay_gamma > 0:
        raise UserError(f"{where}: train.loss_decay_gamma must be > 0 (or unset)")
    if t.block_rows is not None and not block_rows_fit(t.block_rows, cfg.head.block_size, cfg.head.causal):
        raise UserError(f"{where}: train.block_rows must be in [2, head.block_size] and needs head.causal: true "
                        "(a bidirectional row sees the whole block)")
    if t.max_length < cfg.head.block_size + 2:
        raise UserError(f"{where}: train.max_length must exceed head.block_size + 1")
    if not t.lr > 0 or not 0 <= t.min_lr_ratio <= 1 or t.warmup_steps < 0:
        raise UserError(f"{where}: need train.lr > 0, 0 <= train.min_lr_ratio <= 1, train.warmup_steps >= 0")
    f = cfg.features
    if f is not None:
        if not f.taps or f.top_k < 1 or f.shard_size < 1 or f.batch_size < 1 or f.max_length < 2:
            raise UserError(f"{where}: need features.taps non-empty, features.top_k, shard_size, batch_size >= 1")
        if f.limit is not None and f.limit < 1:
            raise UserError(f"{where}: features.limit must be >= 1 (or unset)")
        if t.max_length > f.max_length:
            raise UserError(f"{where}: train.max_length {t.max_length} exceeds features.max_length {f.max_length}")
        missing = sorted(set(cfg.head.target_layer_ids or ()) - set(f.taps))
        if missing:
            raise UserError(f"{where}: head.target_layer_ids {missing} are not in features.taps {list(f.taps)}")
    if cfg.data.max_prompt_tokens < 1:
        raise UserError(f"{where}: data.max_prompt_tokens must be >= 1")
    if cfg.data.max_new_tokens < 1 or cfg.data.batch_size < 1 or cfg.data.temperature < 0:
        raise UserError(f"{where}: need data.max_new_tokens >= 1, data.batch_size >= 1, data.temperature >= 0")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise UserError(f"{where}: data.limit must be >= 1 (or unset)")
    try:
        check_training_sets(cfg.data.prompt_sets)
    except UserError as e:
        raise UserError(f"{where}: data.prompt_sets: {e}") from None


def _output_dir(raw: dict):
    train = raw.get("train")
    return train.get("output_dir") if isinstance(train, dict) else None


def _read_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The YAML mapping of `path` with its `base` chain merged in (this file's keys win)."""
    if path.resolve() in seen:
        raise UserError(f"{path}: base: configs include each other ({' -> '.join(map(str, seen + (path,)))})")
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: malformed YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or "base" not in raw:
        return raw
    raw = dict(raw)
    base_name = raw.pop("base")
    if not isinstance(base_name, str) or not base_name:
        raise UserError(f"{path}: base: expected a config file name, got {base_name!r}")
    base_path = path.parent / base_name
    if not base_path.is_file():
        raise UserError(f"{path}: base: no such config file {base_path}")
    merged = _read_raw(base_path, seen + (path.resolve(),))
    if not isinstance(merged, dict):
        raise UserError(f"{base_path}: expected a YAML mapping at the top level")
    merged = dict(merged)
    base_output = _output_dir(merged)
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    if base_output is not None and _output_dir(merged) == base_output:
        # Training resumes from the checkpoints in output_dir: sharing it would continue the base's run.
        raise UserError(f"{path}: train.output_dir: set one of its own (its base {base_path} writes to {base_output})")
    return merged


def read_config(path) -> TrainConfig:
    path = Path(path)
    return parse_config(_read_raw(path), str(path))
