"""Training batches: which sequences step s reads, and how they are padded.

The data order is a pure function of (seed, step): step s reads the flat positions
`s*B .. s*B+B-1` of an endless stream in which epoch e is a seeded permutation of all sequences.
So resuming at step s needs nothing but s (no loader state to save), and a resumed run reads
exactly the sequences the uninterrupted run would have read.

Batches are padded to a power-of-two length bucket (at least MIN_BUCKET, at most max_length), so
a handful of shapes gets compiled and short batches do not pay for the longest sequence.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jetspec_jax.train.shards import Sequences

MIN_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class Batch:
    tokens: np.ndarray  # (B, L) int32, right-padded with 0
    lengths: np.ndarray  # (B,) int32 sequence lengths (after cutting to max_length)
    prompt_lens: np.ndarray  # (B,) int32
    indices: np.ndarray  # (B,) int64: which stored sequences these are


def usable(data: Sequences, max_length: int) -> np.ndarray:
    """Indices of sequences with at least one anchor left after cutting to max_length
    (the prompt plus at least one response token fit)."""
    lengths = np.array([min(len(t), max_length) for t in data.tokens])
    return np.nonzero(lengths > data.prompt_lens)[0]


def step_indices(pool: np.ndarray, batch_size: int, step: int, seed: int) -> np.ndarray:
    """(B,) indices into the stored sequences for training step `step` (deterministic)."""
    n = len(pool)
    flat = step * batch_size + np.arange(batch_size, dtype=np.int64)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(flat // n):
        order = np.random.default_rng([seed, int(epoch)]).permutation(n)
        here = flat // n == epoch
        out[here] = pool[order[flat[here] % n]]
    return out


def bucket_length(longest: int, max_length: int) -> int:
    return min(max_length, max(MIN_BUCKET, 1 << max(0, longest - 1).bit_length()))


def make_batch(data: Sequences, indices: np.ndarray, max_length: int) -> Batch:
    seqs = [data.tokens[i][:max_length] for i in indices]
    length = bucket_length(max(len(s) for s in seqs), max_length)
    tokens = np.zeros((len(seqs), length), np.int32)
    for row, s in enumerate(seqs):
        tokens[row, : len(s)] = s
    return Batch(tokens=tokens, lengths=np.array([len(s) for s in seqs], np.int32),
                 prompt_lens=data.prompt_lens[indices].astype(np.int32), indices=np.asarray(indices))
