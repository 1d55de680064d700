"""Training checkpoints that resume exactly and are never half-written.

    save_train_checkpoint(root, state, meta)       # -> root/step_00000200
    path = latest_checkpoint(root)                 # newest complete one, or None
    state, meta = restore_train_checkpoint(path, like=fresh_state)

A checkpoint is a directory `step_<8 digits>` holding `state/` (an orbax tree of every leaf of the
train state: step, head params, optimizer state) and `meta.json` (the config it was trained with,
the step, the leaf paths). Both are written into a hidden temporary directory `.tmp-step_...`
that is renamed to its final name only when complete: the rename is the commit. A process killed
mid-save leaves only a temporary directory, which `latest_checkpoint` ignores and the next save
removes. The data position and the anchor RNG are functions of the step (see `batches.py`,
`trainer.py`), so the step restores them too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import jax

from jetspec_jax.errors import UserError

_NAME = re.compile(r"^step_(\d{8})$")
_META = "meta.json"
_STATE = "state"


def _checkpointer():
    import orbax.checkpoint as ocp  # imported lazily: orbax is slow to import

    return ocp.StandardCheckpointer()


def _leaf_paths(tree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _as_dict(leaves) -> dict:
    return {f"leaf_{i:05d}": leaf for i, leaf in enumerate(leaves)}


def checkpoint_steps(root) -> list[int]:
    """Steps of the complete checkpoints under `root`, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / _META).is_file()]
    return sorted(steps)


def latest_checkpoint(root) -> Path | None:
    steps = checkpoint_steps(root)
    return Path(root) / f"step_{steps[-1]:08d}" if steps else None


def _publish(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)  # atomic on POSIX: the checkpoint appears complete or not at all
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def save_train_checkpoint(root, state, meta: dict, keep: int = 2) -> Path:
    """Write `state` (a pytree whose `.step` is an int array) as `root/step_<step>`; keep the
    newest `keep` checkpoints. `meta` (JSON-able) is stored beside it."""
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    step = int(jax.device_get(state.step))
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    leaves = jax.tree_util.tree_leaves(state)
    checkpointer = _checkpointer()
    checkpointer.save(tmp / _STATE, _as_dict(leaves))
    checkpointer.wait_until_finished()
    record = {**meta, "step": step, "leaves": _leaf_paths(state)}
    (tmp / _META).write_text(json.dumps(record, indent=1) + "\n")
    if final.exists():  # a checkpoint of this step already exists (re-run): replace it
        shutil.rmtree(final)
    _publish(tmp, final)
    for old in checkpoint_steps(root)[:-keep]:
        shutil.rmtree(root / f"step_{old:08d}", ignore_errors=True)
    return final


def restore_train_checkpoint(path, like):
    """-> (state shaped like `like`, meta). UserError if `path` is not a complete checkpoint or
    its leaves do not match `like` (another head shape or optimizer)."""
    path = Path(path).absolute()
    if not _NAME.match(path.name) or not (path / _META).is_file():
        raise UserError(f"{path}: not a complete training checkpoint")
    meta = json.loads((path / _META).read_text())
    if meta.get("leaves") != _leaf_paths(like):
        raise UserError(f"{path}: checkpoint holds a different train state (head shape or optimizer changed)")
    leaves, treedef = jax.tree_util.tree_flatten(like)
    target = _as_dict(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves)
    try:
        restored = _checkpointer().restore(path / _STATE, target)
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"{path}: cannot restore ({str(e).splitlines()[0]})") from None
    return jax.tree_util.tree_unflatten(treedef, [restored[k] for k in sorted(restored)]), meta
