"""Matrix products of a few rows on CPU that run at the speed of reading the weights.

Decoding reads every weight once per step. XLA:CPU runs a one-row product as a GEMV at the
memory's speed, but two rows or more go to its GEMM, which on our development machine costs
1.5-1.8x the GEMV (`scripts/bench_cpu_matmul.py`), so every tree round paid that before accepting
a token. This kernel (LLVM IR written in `codegen.py`, compiled for the running CPU by llvmlite,
called by XLA through its typed FFI) streams W once for all rows, one vector accumulator per row
in registers, half of the columns on XLA's intra-op thread pool. Three layouts of W:

    y = matmul(x, w)                # x (..., K) . w (K, N)  (a Dense kernel as loaded)
    y = matmul(x, table, "nk")      # x (..., K) . table (N, K)^T (a tied embedding as LM head)
    y = matmul(x, pack(w), "packed")  # w re-laid out once: tiles of PACK columns, each contiguous
    nn.Dense(..., dot_general=dot_general)   # the (K, N) form inside Flax layers

The packed layout is the fast one: a thread reads one contiguous stream, where (K, N) reads
K_CHUNK short streams that the hardware prefetcher serves badly when N is small; with it a
product of 4 rows costs about one row's time (`scripts/bench_cpu_matmul.py`, docs/bench/cpu_matmul).
`step.prepare_params` packs a loaded model once for decoding (`layers.Linear` reads either form).

It is used where it pays and is correct to use: float32, at most `MAX_ROWS` rows (`PACKED_MAX_ROWS`
packed), dimensions the kernel tiles, on CPU (`lax.platform_dependent`: GPU lowerings get XLA's
dot) with one device (a partitioner cannot split a custom call, so sharded programs keep XLA's
dot). Anything else, and gradients (a custom VJP), use XLA's dot. The compiled machine code is
kept under `$JETSPEC_CACHE/cpu_matmul` (keyed by codegen.py and attention.py, the tiling, the CPU
and llvmlite), so only the first process on a machine pays LLVM's 1-2 seconds. Each output is
one float32 sum over k in increasing order (kn and packed: the same bits) whatever the row
count, so a tree's rows get the same bits as one-row decoding.
`enabled()` says whether it can run here (llvmlite importable, x86-64 or aarch64 Linux/macOS);
JETSPEC_CPU_MATMUL=0 turns it off.

The same module holds the tree attention of a few query rows (`attention.py`, used through
`kernels/tree_attn/cpu.py`): XLA:CPU spends most of a decoding layer's attention on dispatching a
dozen tiny ops, the kernel does it in one call (scripts/profile_round.py).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

MAX_ROWS = 10  # from ~12 rows on, XLA's GEMM is as fast here (scripts/bench_cpu_matmul.py)
# The packed layout's kernel takes any row count but turns compute-bound past a register set:
# 16 rows still beat XLA's GEMM here, 64 take ~1.9x its time (scripts/bench_cpu_matmul.py).
PACKED_MAX_ROWS = 16
TARGETS = {"kn": "jetspec_matmul_kn", "nk": "jetspec_matmul_nk", "packed": "jetspec_matmul_packed"}  # FFI targets
ATTENTION_TARGET = "jetspec_tree_attention"  # attention.py
HEAD_DIMS = (16, 32, 64, 128)  # head dimensions the attention kernel is specialised for
MAX_QUERIES = 16  # tree rows per attention call it takes (more: a prefill chunk, XLA's attention)
FFI_TARGETS = (*TARGETS.values(), ATTENTION_TARGET)  # every handler the module registers
# The kernels' tiling (codegen.py), here so that deciding whether a product fits needs no llvmlite.
LANES = 16      # floats per vector (one AVX-512 register, two AVX2 registers)
K_CHUNK = 16    # rows of W per accumulator round trip (kn)
W_ROWS = 4      # rows of W dotted at once (nk)
PACK = 32       # columns per tile of the packed layout (`pack`)


@functools.cache
def _engine():
    """Compile the kernels for this CPU (or load them from the cache) and register their FFI
    handlers, once per process."""
    import llvmlite
    import llvmlite.binding as llvm

    from jetspec_jax.kernels.cpu_matmul import attention, codegen

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.initialize_native_asmparser()  # the spin-wait's pause instruction is inline assembly
    cpu, features, triple = llvm.get_host_cpu_name(), llvm.get_host_cpu_features(), llvm.get_process_triple()
    wide = bool(features.get("avx512f", False))
    # rows whose accumulators fit the registers
    subs = dict(kn_sub=16 if wide else 6, nk_sub=6 if wide else 2, pk_sub=12 if wide else 2)
    machine = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features.flatten(), opt=3,
                                                                    codemodel="jitdefault")
    here = Path(codegen.__file__).parent
    source = (here / "codegen.py").read_bytes() + (here / "attention.py").read_bytes()
    key = hashlib.sha256(b"\0".join([source, repr((MAX_ROWS, LANES, K_CHUNK, W_ROWS, PACK, HEAD_DIMS, subs)).encode(), cpu.encode(),
                                     features.flatten().encode(), triple.encode(),
                                     llvmlite.__version__.encode()])).hexdigest()[:24]
    cached = _object_dir() / f"{key}.o"
    blob = cached.read_bytes() if cached.is_file() else None
    if blob is None:
        module = codegen.build_module(MAX_ROWS, **subs, triple=triple, data_layout=str(machine.target_data))
        attention.build_attention(module)
        parsed = llvm.parse_assembly(str(module))
        parsed.verify()
        builder = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(speed_level=3))
        builder.getModulePassManager().run(parsed, builder)
        blob = machine.emit_object(parsed)
        _store(cached, blob)
    empty = llvm.parse_assembly(f'target triple = "{triple}"')
    engine = llvm.create_mcjit_compiler(empty, machine)
    engine.add_object_file(llvm.ObjectFileRef.from_data(blob))
    engine.finalize_object()
    for name in FFI_TARGETS:
        address = engine.get_function_address(name)
        if not address:
            raise RuntimeError(f"{name} missing from the compiled kernels")
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(address), platform="cpu")
    return engine


def _object_dir():
    """Where the machine code is kept: `$JETSPEC_CACHE/cpu_matmul` (its name says which source, CPU
    and llvmlite made it, so a stale file is never read)."""
    from jetspec_jax.loading.registry import cache_dir

    return cache_dir() / "cpu_matmul"


def _store(path, obj: bytes) -> None:
    """Keep the machine code for the next process (atomically; a cache that cannot be written only
    means compiling again)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(obj)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


@functools.cache
def enabled() -> bool:
    """The kernel can run in this process (and JETSPEC_CPU_MATMUL is not 0)."""
    if os.environ.get("JETSPEC_CPU_MATMUL", "1") == "0":
        return False
    if sys.platform not in ("linux", "darwin") or platform.machine().lower() not in ("x86_64", "aarch64", "arm64"):
        return False  # the FFI structs' offsets are those of the LP64 C ABI
    try:
        _engine()
    except Exception:  # llvmlite missing or unable to compile here: XLA's dot serves
        return False
    return True


def fits(rows: int, k: int, n: int, layout: str = "kn") -> bool:
    """The kernel tiles this product (a static decision, made while tracing)."""
    if layout == "packed":  # `pack` makes N a multiple of PACK
        return 1 <= rows <= PACKED_MAX_ROWS and k >= 1 and n % PACK == 0
    if not 1 <= rows <= MAX_ROWS:
        return False
    if layout == "kn":
        return k % K_CHUNK == 0 and n % LANES == 0
    return k % LANES == 0 and n % W_ROWS == 0


def packable(k: int, n: int) -> bool:
    """A (K, N) weight can be `pack`ed."""
    return k >= 1 and n >= PACK and n % PACK == 0


@jax.jit
def pack(w: jax.Array) -> jax.Array:
    """A (K, N) weight -> (N / PACK, K, PACK), the layout the "packed" product reads: tile t holds
    columns [t * PACK, (t + 1) * PACK) of every row, one after the other. Build it once per loaded
    model, never inside a jitted step (a transpose of the whole weight)."""
    k, n = w.shape
    return w.reshape(k, n // PACK, PACK).transpose(1, 0, 2)


@jax.jit
def pack_table(table: jax.Array) -> jax.Array:
    """An (N, K) table (an embedding, LM-head rows) -> `pack(table.T)`, the packed (K, N) product
    `x . table^T`, in one program."""
    return pack(table.T)


def unpack(w: jax.Array) -> jax.Array:
    """(N / PACK, K, PACK) -> the (K, N) weight `pack` was given."""
    tiles, k, width = w.shape
    return w.transpose(1, 0, 2).reshape(k, tiles * width)


def active(*dtypes) -> bool:
    """The kernel serves float32 products of these dtypes in this process: CPU backend, one
    device, kernel enabled (GPU machines and several devices never load LLVM)."""
    return (all(d == jnp.float32 for d in dtypes) and jax.default_backend() == "cpu" and len(jax.devices()) == 1
            and enabled())


def _xla(x, w, layout):
    if layout == "packed":  # (M, K) . (T, K, PACK) -> (M, T, PACK): the same columns in order
        return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))).reshape(x.shape[0], -1)
    contract = 0 if layout == "kn" else 1
    return jax.lax.dot_general(x, w, (((1,), (contract,)), ((), ())))


def _columns(w, layout):
    return {"kn": w.shape[-1], "nk": w.shape[0], "packed": w.shape[0] * w.shape[-1]}[layout]


def _kernel(x, w, layout):
    n = _columns(w, layout)
    call = jax.ffi.ffi_call(TARGETS[layout], jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
                            vmap_method="sequential")
    return call(x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _product(x, w, layout):
    return jax.lax.platform_dependent(x, w, cpu=functools.partial(_kernel, layout=layout),
                                      default=functools.partial(_xla, layout=layout))


def _product_fwd(x, w, layout):
    return _product(x, w, layout), (x, w)


def _product_bwd(layout, residuals, g):
    x, w = residuals
    _, vjp = jax.vjp(functools.partial(_xla, layout=layout), x, w)
    return vjp(g)


_product.defvjp(_product_fwd, _product_bwd)


def matmul(x: jax.Array, w: jax.Array, layout: str = "kn") -> jax.Array:
    """x (..., K) . w: (K, N) for layout "kn", (N, K) for "nk", (N / PACK, K, PACK) for "packed"
    (`pack(W)`) -> (..., N) in x's dtype."""
    if layout not in TARGETS:
        raise ValueError(f"layout must be one of {sorted(TARGETS)}, got {layout!r}")
    if w.ndim != (3 if layout == "packed" else 2):
        raise ValueError(f"a {layout!r} weight has {3 if layout == 'packed' else 2} axes, got shape {w.shape}")
    k = x.shape[-1]
    n = _columns(w, layout)
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    use = fits(rows, k, n, layout) and active(x.dtype, w.dtype)
    flat = x.reshape(rows, k)
    out = _product(flat, w, layout) if use else _xla(flat, w, layout)
    return out.reshape(*x.shape[:-1], n)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`lax.dot_general` for Flax's Dense/DenseGeneral (`dot_general=`): their product (lhs's last
    axis against the kernel's first, no batch axes) goes through `matmul`, anything else to XLA."""
    (lc, rc), (lb, rb) = dimension_numbers
    plain = (tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb and precision is None
             and preferred_element_type in (None, lhs.dtype) and not kwargs)
    if not plain:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
    out = matmul(lhs, rhs.reshape(rhs.shape[0], -1))
    return out.reshape(*lhs.shape[:-1], *rhs.shape[1:])
