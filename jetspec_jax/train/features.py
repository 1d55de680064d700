"""The feature cache: the frozen target's taps and top-k next-token log-probs, computed once.

The target never trains, so what the head reads from it (the tapped hidden states of every
position, and for a soft-label loss the target's own next-token distribution) is the same in every
epoch. One pass writes them here; training then costs only the head (SpecForge does the same).

    python -m jetspec_jax.train --config configs/NAME.yaml --stage features   # build or extend

Layout of a cache directory:
    features.json               what the cache holds: target, taps, max_length, top_k, dtype, d
    shard-XXXXX.feat.npy        (T, taps*d) float16: taps of every position, sequences concatenated
    shard-XXXXX.topk_ids.npy    (T, k) int32: the target's k most likely next tokens at each position
    shard-XXXXX.topk_logp.npy   (T, k) float16: their log-probs (full-vocabulary log-softmax)
    shard-XXXXX.json            written last: keys, cut lengths, a digest of each sequence's tokens

A shard under its final `.json` name is complete (every file is written under a temporary name and
renamed; the json goes last), so a killed build loses at most the shard it was writing and a rerun
continues with the sequences not yet cached. Sequences are cached in a fixed order: the validation
split first (so every decision can be measured however early a build stops), then the rest by a
hash of their key, so a partial cache is a mix of every prompt set. A sequence whose stored tokens
no longer match the digest (the data dir was regenerated) makes the cache stale: a one-line error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jetspec_jax.errors import UserError
from jetspec_jax.model import Transformer, init_cache
from jetspec_jax.progress import progress_bar
from jetspec_jax.train.shards import Sequences, _atomic_write, exclusive, prompt_set

FEATURES_MANIFEST = "features.json"
VAL_MODULUS = 20  # one sequence in 20 (by key hash) is held out for validation
LENGTH_STEP = 64  # batches are padded to a multiple of this (few compiled shapes)
FP16_MAX = 65504.0


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "little")


def is_validation(key: str) -> bool:
    """The held-out split: a fixed function of the prompt key, so it never changes as data grows."""
    return key_hash(key) % VAL_MODULUS == 0


def token_digest(tokens: np.ndarray) -> str:
    return hashlib.sha1(np.asarray(tokens, np.int32).tobytes()).hexdigest()[:16]


def build_order(keys: list, first_sets: tuple = ()) -> list:
    """Indices of the sequences in cache order: validation first, then the training sequences of
    `first_sets` (prompt sets, the part of a key before "/"), then the rest, each part by key hash."""
    return sorted(range(len(keys)), key=lambda i: (not is_validation(keys[i]),
                                                   prompt_set(keys[i]) not in first_sets, key_hash(keys[i])))


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What a feature cache holds (the identity a rerun must match)."""

    target: str
    taps: tuple
    max_length: int
    top_k: int
    hidden_size: int

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "taps": list(self.taps), "dtype": "float16"}

    @classmethod
    def of(cls, cfg, hidden_size: int) -> "CacheSpec":
        """The cache a training config (with a features section) describes."""
        f = cfg.features
        return cls(target=cfg.target, taps=tuple(f.taps), max_length=f.max_length, top_k=f.top_k,
                   hidden_size=hidden_size)


def _write_npy(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj) + "\n").encode()))


def _check_manifest(directory: Path, spec: CacheSpec) -> None:
    path = directory / FEATURES_MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        if old != spec.as_json():
            diff = sorted(k for k in set(old) | set(spec.as_json()) if old.get(k) != spec.as_json().get(k))
            raise UserError(f"{directory} holds features made with other settings ({', '.join(diff)} differ); "
                            "use another features dir or delete it")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        _write_json(path, spec.as_json())


def shard_metas(directory) -> list:
    """(path stem, meta dict) of every complete shard, in shard order."""
    out = []
    for path in sorted(Path(directory).glob("shard-*.json")):
        try:
            out.append((path.with_suffix(""), json.loads(path.read_text())))
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: unreadable feature shard ({e}); delete it and rerun the features stage") from None
    return out


def _forward_fn(config, taps: tuple, top_k: int):
    @jax.jit
    def forward(params, tokens):
        b, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (b, length, length))
        logits, feats, _ = Transformer(config).apply(
            {"params": params}, tokens, positions, init_cache(config, b, length), causal, taps=taps)
        logp = jax.nn.log_softmax(logits, axis=-1)
        top_logp, top_ids = jax.lax.top_k(logp, top_k)
        peak = jnp.max(jnp.abs(feats))
        return feats.astype(jnp.float16), top_ids.astype(jnp.int32), top_logp.astype(jnp.float16), peak
    return forward


def build_feature_cache(model, data: Sequences, directory, spec: CacheSpec, *, shard_size: int = 128,
                        batch_size: int = 4, limit: int | None = None, first_sets: tuple = (),
                        progress: bool = True) -> int:
    """Cache the taps and top-k log-probs of every stored sequence not yet cached (resumable).

    limit: cache at most this many sequences in all (None: every one). first_sets: prompt sets whose
    sequences come right after the validation split (`build_order`). Returns sequences cached.
    """
    directory = Path(directory)
    with exclusive(directory, "feature cache"):
        _check_manifest(directory, spec)
        done = {}
        for _, meta in shard_metas(directory):
            done.update(zip(meta["keys"], meta["digests"]))
        index = {k: i for i, k in enumerate(data.keys)}
        for key, digest in done.items():  # refuse to extend a cache of other data
            if key in index and token_digest(data.tokens[index[key]][: spec.max_length]) != digest:
                raise UserError(f"{directory}: cached features of {key} were made from other tokens "
                                "(the data dir changed); delete the features dir and rebuild")
        order = [i for i in build_order(data.keys, tuple(first_sets)) if data.keys[i] not in done]
        wanted = len(data) if limit is None else min(limit, len(data))
        order = order[: max(0, wanted - len(done))]
        next_shard = len(shard_metas(directory))
        forward = _forward_fn(model.config, tuple(spec.taps), spec.top_k)
        bar = progress_bar(total=len(order), desc="features", unit="seq", enabled=progress)
        t0, tokens_done = time.perf_counter(), 0
        for start in range(0, len(order), shard_size):
            chunk = order[start : start + shard_size]
            tokens_done += _write_shard(model, data, directory / f"shard-{next_shard:05d}", chunk, spec,
                                        forward, batch_size, bar)
            next_shard += 1
            bar.set_postfix(tok_s=f"{tokens_done / (time.perf_counter() - t0):.0f}")
        bar.close()
        return len(done) + len(order)


def _write_shard(model, data, stem: Path, chunk: list, spec: CacheSpec, forward, batch_size: int, bar) -> int:
    seqs = [data.tokens[i][: spec.max_length] for i in chunk]
    lengths = np.array([len(s) for s in seqs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    width = len(spec.taps) * spec.hidden_size
    feat = np.zeros((offsets[-1], width), np.float16)
    top_ids = np.zeros((offsets[-1], spec.top_k), np.int32)
    top_logp = np.zeros((offsets[-1], spec.top_k), np.float16)
    by_length = sorted(range(len(seqs)), key=lambda j: -lengths[j])  # similar lengths share a batch
    for b0 in range(0, len(by_length), batch_size):
        rows = by_length[b0 : b0 + batch_size]
        length = -(-int(lengths[rows[0]]) // LENGTH_STEP) * LENGTH_STEP
        tokens = np.zeros((batch_size, length), np.int32)  # a fixed batch: one shape per length bucket
        for r, j in enumerate(rows):
            tokens[r, : lengths[j]] = seqs[j]
        f, ids, lp, peak = jax.device_get(forward(model.params, tokens))
        if not float(peak) < FP16_MAX:
            raise UserError(f"a tapped hidden state reaches {float(peak):.3g}, past float16's range")
        for r, j in enumerate(rows):
            n, o = lengths[j], offsets[j]
            feat[o : o + n], top_ids[o : o + n], top_logp[o : o + n] = f[r, :n], ids[r, :n], lp[r, :n]
        bar.update(len(rows))
    _write_npy(stem.with_suffix(".feat.npy"), feat)
    _write_npy(stem.with_suffix(".topk_ids.npy"), top_ids)
    _write_npy(stem.with_suffix(".topk_logp.npy"), top_logp)
    meta = {"keys": [data.keys[i] for i in chunk], "lengths": lengths.tolist(),
            "digests": [token_digest(s) for s in seqs]}
    _write_json(stem.with_suffix(".json"), meta)
    return int(offsets[-1])
