"""Reading the feature cache (written by features.py): memory-mapped shards, batches by sequence.

    store = FeatureStore.open("runs/features/smollm2-135m", spec, data)
    batch = store.batch(indices, max_length, taps=(1, 8, 14, 20, 27))

Opening checks that the cache was made for this target and these settings (`features.json`), that
every shard file is whole (a truncated `.npy` fails to map), and that every cached sequence's
tokens still match the data dir (a digest per sequence); any of these is a one-line UserError.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from jetspec_jax.errors import UserError
from jetspec_jax.train.batches import bucket_length
from jetspec_jax.train.features import FEATURES_MANIFEST, CacheSpec, shard_metas, token_digest
from jetspec_jax.train.shards import Sequences


@dataclasses.dataclass(frozen=True)
class FeatureBatch:
    tokens: np.ndarray  # (B, L) int32, right-padded with 0
    lengths: np.ndarray  # (B,) int32
    prompt_lens: np.ndarray  # (B,) int32
    features: np.ndarray  # (B, L, taps*d) float32 (the requested taps, in that order)
    topk_ids: np.ndarray  # (B, L, k) int32: the target's top-k next tokens at each position
    topk_logp: np.ndarray  # (B, L, k) float32


def _map(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: missing from the feature cache; delete its shard json and rerun the features stage") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: truncated or unreadable feature shard ({e}); delete it and its json and rerun "
                        "the features stage") from None


class FeatureStore:
    """Where each cached sequence lives: {data index: (shard arrays, offset, length)}."""

    def __init__(self, spec: CacheSpec, where: dict):
        self.spec = spec
        self._where = where

    @classmethod
    def open(cls, directory, spec: CacheSpec, data: Sequences) -> "FeatureStore":
        directory = Path(directory)
        path = directory / FEATURES_MANIFEST
        if not path.is_file():
            raise UserError(f"{directory}: no feature cache ({FEATURES_MANIFEST} missing); run the features stage")
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: unreadable ({e})") from None
        if stored != spec.as_json():
            diff = sorted(k for k in set(stored) | set(spec.as_json()) if stored.get(k) != spec.as_json().get(k))
            raise UserError(f"{directory}: feature cache made with other settings ({', '.join(diff)} differ)")
        index = {k: i for i, k in enumerate(data.keys)}
        width = len(spec.taps) * spec.hidden_size
        where = {}
        for stem, meta in shard_metas(directory):
            arrays = tuple(_map(stem.with_suffix(s)) for s in (".feat.npy", ".topk_ids.npy", ".topk_logp.npy"))
            total = int(sum(meta["lengths"]))
            if arrays[0].shape != (total, width) or arrays[1].shape != (total, spec.top_k):
                raise UserError(f"{stem}: shard shapes {arrays[0].shape}, {arrays[1].shape} do not match its "
                                f"json ({total} positions, width {width}, top-k {spec.top_k}); rebuild it")
            offset = 0
            for key, length, digest in zip(meta["keys"], meta["lengths"], meta["digests"]):
                i = index.get(key)
                if i is None or token_digest(data.tokens[i][: spec.max_length]) != digest:
                    raise UserError(f"{directory}: stale feature cache: {key} is "
                                    f"{'gone from' if i is None else 'different in'} the data dir; "
                                    "delete the features dir and rebuild it")
                where[i] = (arrays, offset, length)
                offset += length
        if not where:
            raise UserError(f"{directory}: the feature cache holds no shard yet; run the features stage")
        return cls(spec, where)

    def cached(self) -> np.ndarray:
        """Data indices of every cached sequence, ascending."""
        return np.array(sorted(self._where), np.int64)

    def batch(self, data: Sequences, indices, max_length: int, taps: tuple) -> FeatureBatch:
        cols = _tap_columns(self.spec, taps)
        seqs = [data.tokens[i][:max_length] for i in indices]
        length = bucket_length(max(len(s) for s in seqs), max_length)
        b, d, k = len(seqs), len(cols), self.spec.top_k
        tokens = np.zeros((b, length), np.int32)
        feats = np.zeros((b, length, d), np.float32)
        ids = np.zeros((b, length, k), np.int32)
        logp = np.zeros((b, length, k), np.float32)
        for r, (i, s) in enumerate(zip(indices, seqs)):
            (f, t_ids, t_logp), offset, stored = self._where[int(i)]
            n = min(len(s), stored)
            tokens[r, : len(s)] = s
            feats[r, :n] = f[offset : offset + n][:, cols]
            ids[r, :n] = t_ids[offset : offset + n]
            logp[r, :n] = t_logp[offset : offset + n]
        return FeatureBatch(tokens, np.array([len(s) for s in seqs], np.int32),
                            data.prompt_lens[np.asarray(indices)].astype(np.int32), feats, ids, logp)


def _tap_columns(spec: CacheSpec, taps: tuple) -> np.ndarray:
    """Columns of a cached row holding `taps` (each a d-wide slice), in the order of `taps`."""
    missing = [t for t in taps if t not in spec.taps]
    if missing:
        raise UserError(f"the feature cache holds taps {list(spec.taps)}, not {missing}")
    d = spec.hidden_size
    return np.concatenate([np.arange(d) + spec.taps.index(t) * d for t in taps])
