"""Token storage for regenerated training data: append-only shards of compact arrays.

A data directory holds `manifest.json` (how the data was made) and shards `shard-00000.npz`,
each with, for its n sequences:

    tokens       (sum of lengths,) uint16 (vocab <= 65536) or int32: prompt + response ids, concatenated
    offsets      (n + 1,) int64: sequence i is tokens[offsets[i]:offsets[i+1]]
    prompt_lens  (n,) int32: the first prompt_lens[i] ids are the chat-templated prompt
    stopped      (n,) bool: the response ended on an end-of-turn id (else it hit max_new_tokens)
    keys         (n,) str: "<prompt set>/<index>", so a restart skips prompts already answered

Every file is written under a temporary name and renamed, so a shard under its final name is
complete; an interrupted run loses at most the batch it was generating.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from jetspec_jax.errors import UserError

MANIFEST = "manifest.json"


@dataclasses.dataclass
class Sequences:
    """All sequences of a data directory, in shard order."""

    tokens: list  # of (n_i,) int32 arrays
    prompt_lens: np.ndarray  # (N,) int32
    keys: list  # of str
    stopped: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.tokens)


def prompt_set(key: str) -> str:
    """The prompt set of a sequence key "<set>/<index>" (data.chat_prompts)."""
    return key.rsplit("/", 1)[0]


def _atomic_write(path: Path, write) -> None:
    """write(file object) into a temporary sibling, then rename it to `path` (mode 0644:
    mkstemp creates it private, and data and feature shards are shared like the heads)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def exclusive(directory, what: str):
    """Hold an exclusive lock on `directory` (created if missing) for the block: a second
    process writing the same folder would interleave shard numbers and duplicate answers."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{directory} is in use by another process ({what}); wait for it or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


GROWS = "prompt_sets"  # the one manifest entry a data dir may extend


def write_manifest(directory, manifest: dict) -> None:
    """Create the manifest, or check that an existing one describes the same data.

    Prompt sets may be added to a data dir (answers are keyed by set and index, and every set is
    answered under the same settings): the manifest then lists every set ever used.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(manifest) if k != GROWS and old.get(k) != manifest.get(k))
        if diff:
            raise UserError(f"{directory} holds data made with other settings ({', '.join(diff)} differ); "
                            "use a new data dir or delete it")
        sets = list(dict.fromkeys([*old.get(GROWS, []), *manifest.get(GROWS, [])]))
        if sets == old.get(GROWS, []):
            return
        manifest = {**old, GROWS: sets}
    _atomic_write(path, lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode()))


def read_manifest(directory) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory}: no regenerated data ({MANIFEST} missing); run the data stage first")
    return json.loads(path.read_text())


def shard_paths(directory) -> list[Path]:
    return sorted(Path(directory).glob("shard-*.npz"))


def write_shard(directory, index: int, sequences: list, prompt_lens: list, keys: list, stopped: list,
                vocab_size: int) -> Path:
    """Write shard `index` (sequences: lists/arrays of ids, prompt included)."""
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
    lengths = np.array([len(s) for s in sequences], np.int64)
    arrays = dict(
        tokens=np.concatenate([np.asarray(s, np.int64) for s in sequences]).astype(dtype),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        prompt_lens=np.asarray(prompt_lens, np.int32),
        stopped=np.asarray(stopped, bool),
        keys=np.asarray(keys, dtype=str),
    )
    path = Path(directory) / f"shard-{index:05d}.npz"
    _atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def done_keys(directory) -> set:
    """Keys of every sequence already stored."""
    keys = set()
    for path in shard_paths(directory):
        with np.load(path, allow_pickle=False) as z:
            keys.update(z["keys"].tolist())
    return keys


def read_sequences(directory) -> Sequences:
    """Every stored sequence (as int32 arrays)."""
    tokens, prompt_lens, keys, stopped = [], [], [], []
    for path in shard_paths(directory):
        try:
            with np.load(path, allow_pickle=False) as z:
                flat, offsets = z["tokens"].astype(np.int32), z["offsets"]
                tokens += [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
                prompt_lens.append(z["prompt_lens"])
                keys += z["keys"].tolist()
                stopped.append(z["stopped"])
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"{path}: unreadable shard ({e}); delete it and rerun the data stage") from None
    if not tokens:
        raise UserError(f"{directory}: no shards; run the data stage first")
    return Sequences(tokens, np.concatenate(prompt_lens), keys, np.concatenate(stopped))
