"""Compiled programs kept between runs as serialized StableHLO, so that a second run of the same
shapes neither traces nor lowers the model.

    program_cache.enable(cache_dir() / "programs")   # the CLI does this (with JAX's compilation cache)
    program = program_cache.compile("decode", jax.jit(fn), args, key=(config,), donate=(1,))
    out = program(*args)                            # as jax.jit(fn)(*args); program.out_info: its avals

JAX's persistent compilation cache already keeps the XLA executables, but it is looked up by the
lowered module, so every run first traces and lowers the whole model to find it: 1.3-2 s of the
~3 s a second run of `python -m jetspec_jax.generate` spent compiling SmolLM2-135M on a 2-core
machine. Here the lowered program itself (`jax.export`, flattened to a tuple of arrays in and out)
is stored under a key of everything that decides it: the function's name and static `key`, the
argument tree and avals, the JAX/jaxlib/Flax versions, the platform and a digest of this package's
source files (an edited checkout never runs a stale program). Loading it costs a parse and a
cheap lowering of one call; its compilation then hits JAX's cache.

Single-device programs only (no shardings in the avals): a program lowered over a mesh, or with
the cache off (`enable` never called, JETSPEC_COMPILATION_CACHE=0), compiles as before. An entry
that cannot be read is compiled again and overwritten.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import jax
import jaxlib

_DIR: Path | None = None
_SOURCE_DIGEST: str | None = None
_FORMAT = "1"  # bump when what an entry holds changes
MAX_BYTES = 512 << 20  # entries past this, least recently used first, are removed (~0.4-0.8 MB each for SmolLM2)


def enable(directory: str | os.PathLike) -> None:
    global _DIR
    _DIR = Path(directory)


def disable() -> None:
    global _DIR
    _DIR = None


def _source_digest() -> str:
    """sha256 over this package's Python sources (names and bytes); ~100 files, a few ms."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        import jetspec_jax
        import jetspec_jax.kernels

        h = hashlib.sha256()
        for root in sorted({Path(jetspec_jax.__file__).parent, Path(jetspec_jax.kernels.__file__).parent}):
            for file in sorted(root.rglob("*.py")):
                h.update(os.fspath(file.relative_to(root)).encode())
                h.update(file.read_bytes())
        _SOURCE_DIGEST = h.hexdigest()
    return _SOURCE_DIGEST


def _avals(leaves) -> list:
    return [(tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False))) for x in leaves]


def entry_key(name: str, key, treedef, leaves) -> str:
    device = jax.devices()[0]
    import flax  # the models are Flax modules: its version changes what they trace to

    flags = (jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision)  # change the lowering
    parts = (_FORMAT, name, repr(key), str(treedef), repr(_avals(leaves)), jax.__version__, jaxlib.__version__,
             flax.__version__, device.platform, device.device_kind, flags, _source_digest())
    return hashlib.sha256(repr(parts).encode()).hexdigest()


class Program:
    """A compiled program called with the original argument pytrees; returns the output pytree."""

    def __init__(self, compiled, out_tree, out_info, flat: bool):
        self._compiled, self._out_tree, self.out_info, self._flat = compiled, out_tree, out_info, flat

    def __call__(self, *args):
        if not self._flat:
            return self._compiled(*args)
        return jax.tree.unflatten(self._out_tree, self._compiled(*jax.tree.leaves(args)))


def _cacheable(leaves) -> bool:
    if _DIR is None or jax.process_count() > 1:
        return False
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        if sharding is not None and len(sharding.device_set) > 1:
            return False
    return True


def compile(name: str, jitted, args: tuple, *, key, donate: tuple[int, ...] = ()) -> Program:
    """`jitted.lower(*args).compile()` through the program cache when it is on and applies.

    name: names the entry's file. jitted: a `jax.jit` function with its static arguments bound
    (functools.partial before jit), called with `args` only.
    key: hashable, with a repr that names every static value the program depends on.
    donate: positions in `args` whose arrays the program may reuse (as jit's donate_argnums).
    """
    leaves, treedef = jax.tree.flatten(args)
    if not _cacheable(leaves):
        return _uncached(jitted, args)
    path = _DIR / f"{name}-{entry_key(name, key, treedef, leaves)}.bin"
    flat_donate = _flat_positions(args, donate)
    entry = _read(path)
    if entry is None:
        try:
            entry = _export(jitted, args, treedef)
        except Exception:  # noqa: BLE001 - what jax.export refuses (e.g. a custom call) compiles as usual
            return _uncached(jitted, args)
        _write(path, entry)
    exported, out_tree, out_info = entry

    def call(*flat_args):
        return exported.call(*flat_args)

    call.__name__ = call.__qualname__ = name  # logs and the XLA cache's file names say "jit_<name>"
    compiled = jax.jit(call, donate_argnums=flat_donate).lower(*leaves).compile()
    return Program(compiled, out_tree, out_info, flat=True)


def _uncached(jitted, args) -> Program:
    compiled = jitted.lower(*args).compile()
    return Program(compiled, None, compiled.out_info, flat=False)


def _flat_positions(args, donate) -> tuple[int, ...]:
    out, start = [], 0
    for i, a in enumerate(args):
        n = len(jax.tree.leaves(a))
        if i in donate:
            out += range(start, start + n)
        start += n
    return tuple(out)


def _export(jitted, args, treedef):
    from jax import export

    out = {}

    def flat(*leaves):
        out_leaves, out["tree"] = jax.tree.flatten(jitted(*jax.tree.unflatten(treedef, leaves)))
        return tuple(out_leaves)

    from jetspec_jax.kernels import cpu_matmul

    # The CPU matrix kernel is registered by name in every process that builds a model
    # (cpu_matmul.enabled(), called again in _read before a cached program runs).
    checks = [export.DisabledSafetyCheck.custom_call(name) for name in cpu_matmul.FFI_TARGETS]
    exported = export.export(jax.jit(flat), disabled_checks=checks)(*jax.tree.leaves(args))
    info = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in exported.out_avals]
    return exported, out["tree"], jax.tree.unflatten(out["tree"], info)


def _read(path: Path):
    from jax import export

    from jetspec_jax.kernels import cpu_matmul

    try:
        blob, out_tree, out_info = pickle.loads(path.read_bytes())
        if any(name.encode() in blob for name in cpu_matmul.FFI_TARGETS) and not cpu_matmul.enabled():
            return None  # made where the kernel ran; here it cannot: trace again
        entry = export.deserialize(bytearray(blob)), out_tree, out_info
        os.utime(path)  # recently used: the last to be pruned
        return entry
    except Exception:  # absent, truncated, or written by another version: compile and overwrite
        return None


def _write(path: Path, entry) -> None:
    exported, out_tree, out_info = entry
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(pickle.dumps((exported.serialize(), out_tree, out_info)))
        os.replace(tmp, path)
        _prune(path.parent, keep=path)
    except OSError:  # a cache that cannot be written only means compiling again next time
        if tmp.exists():
            tmp.unlink()


def _prune(directory: Path, keep: Path) -> None:
    """Remove the least recently used entries until the folder holds at most MAX_BYTES."""
    entries = []
    for p in directory.glob("*.bin"):
        try:
            st = p.stat()
        except OSError:  # removed by another process meanwhile
            continue
        entries.append((st.st_mtime_ns, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries):
        if total <= MAX_BYTES:
            break
        if p != keep:
            p.unlink(missing_ok=True)
            total -= size
