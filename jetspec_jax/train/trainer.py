"""The training loop: data, jitted steps, progress, checkpoints, and the exported head.

    head_cfg, params = train(read_config("configs/smollm2-135m-causal.yaml"))

Layout of `train.output_dir`:
    checkpoints/step_XXXXXXXX/   resumable train state (see checkpoint.py), newest `keep` kept
    head/                        the head in HF format (`save_head_dir`), refreshed at checkpoints
    metrics.jsonl                one line per step: loss, per-depth accuracy and loss, lr, grad norm

A run resumes from the newest complete checkpoint when its config matches (head and train
settings, and the number of stored sequences); otherwise it refuses (UserError) rather than
silently continue a different run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jetspec_jax.config import ModelConfig
from jetspec_jax.errors import UserError
from jetspec_jax.head import HeadConfig, check_head_fits, default_target_layer_ids, init_head_params
from jetspec_jax.loading.head_io import load_head_dir, save_head_dir
from jetspec_jax.ngrams import without_ngrams
from jetspec_jax.progress import progress_bar
from jetspec_jax.train.batches import make_batch, step_indices, usable
from jetspec_jax.train.checkpoint import latest_checkpoint, restore_train_checkpoint, save_train_checkpoint
from jetspec_jax.train.config import HeadSection, TrainConfig
from jetspec_jax.train.feature_store import FeatureStore
from jetspec_jax.train.features import CacheSpec, is_validation
from jetspec_jax.train.objective import ObjectiveConfig
from jetspec_jax.train.shards import exclusive, read_manifest, read_sequences
from jetspec_jax.train.step import StepConfig, init_train_state, train_step
from jetspec_jax.train.validate import coverage, draft_vocabulary, validate, vocab_tables, widen_draft_vocabulary

# Train settings that do not change what a run computes (may differ on resume).
_BOOKKEEPING = ("output_dir", "checkpoint_every", "keep_checkpoints")
# Settings added after runs had started: left unset they compute what those runs did, so they stay
# out of the identity (a run from before them still resumes).
_ADDED_LATER = ("block_rows",)


NEW_HEAD_TAPS = 5


def training_taps(num_target_layers: int) -> tuple[int, ...]:
    """Taps of a new head when its config names none: five layers from low to late, whatever the
    head's depth (DFlash's spacing from 1 to L-3; for 30 layers (1, 8, 14, 20, 27)). A single
    middle tap, DFlash's default for a one-layer head, loses most of the acceptance (EAGLE-3 and
    DFlash ablations). Targets of fewer than 8 layers tap every layer."""
    if num_target_layers < 8:
        return tuple(range(num_target_layers))
    return default_target_layer_ids(num_target_layers, NEW_HEAD_TAPS)


def head_config(section: HeadSection, target: ModelConfig) -> HeadConfig:
    """The head's static config: the YAML's shape, the target's values where unset."""
    pick = lambda value, default: default if value is None else value  # noqa: E731
    try:
        cfg = HeadConfig(
            hidden_size=target.hidden_size, num_layers=section.num_layers,
            num_heads=pick(section.num_heads, target.num_heads),
            num_kv_heads=pick(section.num_kv_heads, target.num_kv_heads),
            head_dim=pick(section.head_dim, target.head_dim),
            intermediate_size=pick(section.intermediate_size, target.intermediate_size),
            vocab_size=target.vocab_size, num_target_layers=target.num_layers,
            mask_token_id=section.mask_token_id, block_size=section.block_size,
            target_layer_ids=section.target_layer_ids or training_taps(target.num_layers), causal=section.causal,
            rope_theta=pick(section.rope_theta, target.rope_theta),
            rms_norm_eps=pick(section.rms_norm_eps, target.rms_norm_eps), dtype=target.dtype,
            draft_vocab_size=section.draft_vocab_size)
    except ValueError as e:
        raise UserError(f"bad head config: {e}") from None
    check_head_fits(cfg, target)
    return cfg


def step_config(cfg: TrainConfig, head: HeadConfig, target: ModelConfig) -> StepConfig:
    t = cfg.train
    objective = ObjectiveConfig(target=target, head=head, anchors_per_seq=t.anchors_per_seq,
                                loss=t.loss, vocab_chunk=t.vocab_chunk, loss_decay_gamma=t.loss_decay_gamma,
                                block_rows=t.block_rows)
    return StepConfig(objective=objective, steps=t.steps, lr=t.lr, warmup_steps=t.warmup_steps,
                      min_lr_ratio=t.min_lr_ratio, weight_decay=t.weight_decay, clip_norm=t.clip_norm,
                      seed=t.seed)


def _run_identity(cfg: TrainConfig, num_sequences: int, pool_size: int) -> dict:
    """What must match for a checkpoint to be resumed by this config."""
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items()
             if k not in _BOOKKEEPING and not (k in _ADDED_LATER and v is None)}
    out = {"target": cfg.target, "head": dataclasses.asdict(cfg.head), "train": train,
           "num_sequences": num_sequences}
    if cfg.features is not None:  # the sequences a step reads depend on what the cache held
        out["features"] = {"dir": cfg.features.dir, "taps": list(cfg.features.taps), "pool": pool_size}
    return out


def _initial_params(t, head_cfg: HeadConfig) -> dict:
    """Random init, or the params of `train.init_from`, so that a later run continues training a
    shipped head with a fresh optimizer and schedule -> (params, d2t or None).

    The head in init_from must have this config's shape, except that it may tap a subset of this
    config's layers (`widen_taps`: the new taps start with zero weight), may have fewer layers
    (`deepen`: the new layers are appended with zero residual branches), in both cases so that the
    run starts from exactly that head's drafts, and may lack the draft vocabulary (the head owns no
    output layer, so a reduced vocabulary changes no parameter) or have a smaller one (its d2t comes
    back as it is; `widen_draft_vocabulary` appends the rest).
    """
    if t.init_from is None:
        return init_head_params(head_cfg, jax.random.PRNGKey(t.seed)), None
    cfg, params = load_head_dir(t.init_from, dtype=head_cfg.dtype)
    cfg, params = without_ngrams(cfg, params)  # a table shipped with that head is no parameter
    params = dict(params)
    d2t = params.pop("d2t", None)
    k = head_cfg.draft_vocab_size
    if k is not None and (cfg.draft_vocab_size is None or cfg.draft_vocab_size < k):
        cfg = cfg.replace(draft_vocab_size=k)  # no d2t or a shorter one: the caller builds or widens it
    if cfg.target_layer_ids != head_cfg.target_layer_ids and set(cfg.target_layer_ids) <= set(head_cfg.target_layer_ids):
        params = widen_taps(params, cfg.target_layer_ids, head_cfg.target_layer_ids, cfg.hidden_size)
        cfg = cfg.replace(target_layer_ids=head_cfg.target_layer_ids)
    if cfg.num_layers < head_cfg.num_layers and cfg.replace(num_layers=head_cfg.num_layers) == head_cfg:
        params = deepen(params, cfg.num_layers, head_cfg, jax.random.PRNGKey(t.seed))
        cfg = head_cfg
    if cfg != head_cfg:
        diff = sorted(f.name for f in dataclasses.fields(HeadConfig) if getattr(cfg, f.name) != getattr(head_cfg, f.name))
        raise UserError(f"train.init_from {t.init_from}: that head differs from this config in {', '.join(diff)}")
    return params, None if d2t is None else np.asarray(d2t)


def widen_taps(params: dict, old_taps: tuple, new_taps: tuple, d: int) -> dict:
    """Head params reading `old_taps` -> params reading `new_taps` (a superset) that compute the
    same function: fc rows of the old taps are copied, rows of the new taps are zero."""
    old = np.asarray(params["fc"]["kernel"])  # (len(old_taps) * d, d)
    fc = np.zeros((len(new_taps) * d, old.shape[1]), old.dtype)
    for i, tap in enumerate(old_taps):
        j = new_taps.index(tap)
        fc[j * d : (j + 1) * d] = old[i * d : (i + 1) * d]
    return {**params, "fc": {**params["fc"], "kernel": jax.numpy.asarray(fc)}}


def deepen(params: dict, old_layers: int, cfg: HeadConfig, key: jax.Array) -> dict:
    """Head params with `old_layers` layers -> params of `cfg` (more layers) that compute the same
    function: layers 0..old_layers-1, fc and the norms are copied; each new layer, appended after
    them, is randomly initialised except its residual branches' output projections (attention's
    o_proj, the MLP's down_proj), which are zero, so it adds exactly nothing until trained (the
    first step gives those projections a gradient, then the rest of the layer learns)."""
    fresh = init_head_params(cfg, key)
    zero = lambda tree: jax.tree_util.tree_map(jax.numpy.zeros_like, tree)  # noqa: E731
    out = {**fresh, **params}  # fc, the norms and layers 0..old_layers-1 from the shallower head
    for i in range(old_layers, cfg.num_layers):
        layer = fresh[f"layers_{i}"]
        out[f"layers_{i}"] = {**layer, "attn": {**layer["attn"], "o_proj": zero(layer["attn"]["o_proj"])},
                              "mlp": {**layer["mlp"], "down_proj": zero(layer["mlp"]["down_proj"])}}
    return out


METRICS = "metrics.jsonl"


def _log_val(path: Path, step: int, val: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "val": val}) + "\n")


def _log_metrics(path: Path, step: int, metrics: dict, seconds: float, tokens: int) -> None:
    """Append one JSON line per step (a resumed run may repeat the steps after its checkpoint:
    the last line of a step wins)."""
    row = {"step": step, "loss": float(metrics["loss"]), "acc": np.round(metrics["acc"], 4).tolist(),
           "depth_loss": np.round(metrics["depth_loss"], 4).tolist(), "lr": float(metrics["lr"]),
           "grad_norm": float(metrics["grad_norm"]), "seconds": round(seconds, 2), "tokens": tokens}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _jsonable(x):
    return jax.tree_util.tree_map(lambda v: list(v) if isinstance(v, tuple) else v, x,
                                  is_leaf=lambda v: isinstance(v, tuple))


def train(cfg: TrainConfig, *, model=None, on_step=None, progress: bool = True):
    """Train (or resume training) the head; returns (HeadConfig, params).

    model: the loaded target (`.config`, `.params`), loaded from `cfg.target` if None.
    on_step(step, metrics, indices): called after each step (and its checkpoint) with host
    metrics and the sequence indices the step read (tests use it to interrupt runs).
    A second process training into the same output_dir is refused (UserError).
    """
    with exclusive(cfg.train.output_dir, "training"):
        return _train(cfg, model=model, on_step=on_step, progress=progress)


def _train(cfg: TrainConfig, *, model, on_step, progress):
    if model is None:
        from jetspec_jax.loading import load_model

        model = load_model(cfg.target)
    target_cfg = model.config
    head_cfg = head_config(cfg.head, target_cfg)
    manifest = read_manifest(cfg.data.dir)
    if manifest.get("vocab_size") != target_cfg.vocab_size:
        raise UserError(f"{cfg.data.dir} was generated with a vocabulary of {manifest.get('vocab_size')}, "
                        f"the target has {target_cfg.vocab_size}")
    data = read_sequences(cfg.data.dir)
    t = cfg.train
    pool = usable(data, t.max_length)
    store, val_pool = None, np.zeros(0, np.int64)
    if cfg.features is not None:
        store, pool, val_pool = _open_cache(cfg, data, target_cfg, pool)
    if len(pool) == 0:
        raise UserError(f"{cfg.data.dir}: no sequence has a response within train.max_length={t.max_length}")
    spec = step_config(cfg, head_cfg, target_cfg)
    identity = _jsonable(_run_identity(cfg, len(data), len(pool)))

    out = Path(t.output_dir)
    ckpt_root = out / "checkpoints"
    params, d2t = _initial_params(t, head_cfg)
    vocab = None
    if head_cfg.draft_vocab_size is not None:
        train_split = [i for i in range(len(data)) if not is_validation(data.keys[i])]
        if d2t is None:  # the most frequent tokens of the training answers (never the validation split)
            d2t = draft_vocabulary(data, train_split, target_cfg.vocab_size, head_cfg.draft_vocab_size)
        elif len(d2t) < head_cfg.draft_vocab_size:  # init_from's ids first, then the most frequent others
            d2t = widen_draft_vocabulary(d2t, data, train_split, target_cfg.vocab_size, head_cfg.draft_vocab_size)
        vocab = vocab_tables(d2t, target_cfg.vocab_size)
        if len(val_pool):
            print(f"draft vocabulary {len(d2t)}: {coverage(data, val_pool, d2t):.2%} of validation answer "
                  "tokens", file=sys.stderr)
    state = init_train_state(spec, params)
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        state, meta = restore_train_checkpoint(latest, like=state)
        if meta.get("run") != identity:
            raise UserError(f"{latest} was trained with another config; use a new train.output_dir")
        if d2t is not None and meta.get("d2t") is not None:
            d2t = np.asarray(meta["d2t"], np.int32)
            vocab = vocab_tables(d2t, target_cfg.vocab_size)
    exported = lambda p: p if d2t is None else {**p, "d2t": jax.numpy.asarray(d2t)}  # noqa: E731
    meta = {"run": identity, **({} if d2t is None else {"d2t": d2t.tolist()})}

    def run_validation(step: int) -> None:
        if store is None or not len(val_pool):
            return
        batches = (store.batch(data, val_pool[i : i + t.batch_size], t.max_length, head_cfg.target_layer_ids)
                   for i in range(0, len(val_pool), t.batch_size))
        # the whole block, whatever the step trains: the chain and N=16 draft 15 deep
        whole = dataclasses.replace(spec.objective, block_rows=None)
        val = validate(state.params, model.params, vocab, whole, batches)
        _log_val(out / METRICS, step, val)
        bar.write(f"step {step}: validation {val}")

    start = int(state.step)
    bar = progress_bar(total=t.steps, initial=start, desc="training", unit="step", enabled=progress)
    tokens_seen, anchors_seen, t0 = 0, 0, time.perf_counter()
    for step in range(start, t.steps):
        indices = step_indices(pool, t.batch_size, step, t.seed)
        if store is None:
            batch = make_batch(data, indices, t.max_length)
            cached = None
        else:
            batch = store.batch(data, indices, t.max_length, head_cfg.target_layer_ids)
            cached = {"features": batch.features, "topk_ids": batch.topk_ids, "topk_logp": batch.topk_logp}
        state, metrics = train_step(state, model.params, batch.tokens, batch.lengths, batch.prompt_lens,
                                    cached, vocab, spec=spec)
        metrics = jax.device_get(metrics)
        if not np.isfinite(metrics["loss"]):
            raise RuntimeError(f"loss became {metrics['loss']} at step {step}")
        tokens_seen += int(batch.lengths.sum())
        anchors_seen += int(metrics["depth_rows"][0])
        _log_metrics(out / METRICS, step, metrics, time.perf_counter() - t0, tokens_seen)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc1=f"{metrics['acc'][0]:.3f}",
                        anchor_s=f"{anchors_seen / (time.perf_counter() - t0):.0f}")
        done = step + 1
        if done % t.checkpoint_every == 0 or done == t.steps:
            save_train_checkpoint(ckpt_root, state, meta, keep=t.keep_checkpoints)
            save_head_dir(out / "head", head_cfg, exported(state.params), overwrite=True)
        if done % t.val_every == 0 or done == t.steps:
            run_validation(done)
        if on_step is not None:
            on_step(step, metrics, indices)
    bar.close()
    return head_cfg, exported(state.params)


def _open_cache(cfg: TrainConfig, data, target_cfg: ModelConfig, pool: np.ndarray):
    """The feature store, and the cached sequences of the training and validation splits."""
    store = FeatureStore.open(cfg.features.dir, CacheSpec.of(cfg, target_cfg.hidden_size), data)
    cached = np.intersect1d(store.cached(), pool)
    held_out = np.array([is_validation(data.keys[i]) for i in cached], bool)
    return store, cached[~held_out], cached[held_out]
