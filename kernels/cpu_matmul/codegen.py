"""LLVM IR of the small-row CPU matrix product, compiled for this machine's CPU with llvmlite.

Three kernels, all `out[M, N] = x[M, K] . W` in float32, row-major buffers:

- `kn`: W is (K, N) (a Dense kernel as loaded). `K_CHUNK` rows of W at a time (as many sequential
  streams) multiply tiles of `LANES` columns into one vector accumulator per x row, added into `out`
  (M x N floats, in L2) after each chunk. W streams from memory once for all rows; each output is
  summed over k in increasing order whatever M is.
- `nk`: W is (N, K) (a tied embedding used as the LM head). `W_ROWS` rows of W at a time are dotted
  with every x row, each product summed in `LANES` partial sums reduced at the end.
- `packed`: W is (N / PACK, K, PACK) (`pack`ed once at load time): each tile of `PACK` columns is
  one contiguous run of memory, read in order, so one thread reads one stream (the `kn` layout
  reads `K_CHUNK` short streams, which the hardware prefetcher serves badly when N is small). A
  tile's accumulators stay in registers over all of K; each output is the float32 sum over k in
  increasing order, the same bits as `kn`. Any row count: more rows than a register set holds
  reread each tile from cache, one register set at a time.

`kn` and `nk` are specialised for every row count 1..max_rows, `packed` for every row count of one
register set, in register sets of a few rows that share each tile of W while it sits in cache. The
handlers are XLA FFI handlers (the typed C ABI of
`xla/ffi/api/c_api.h`): each answers XLA's metadata query, reads its buffers (x, W, out) and their
dimensions, and computes the output columns in two halves, the second offered to XLA's intra-op
thread pool (one core alone streams W at ~2/3 of the memory's speed here).
"""

from __future__ import annotations

from llvmlite import ir

from jetspec_jax.kernels.cpu_matmul import K_CHUNK, LANES, PACK, W_ROWS

F32 = ir.FloatType()
I32 = ir.IntType(32)
I64 = ir.IntType(64)
PTR = ir.PointerType()
VEC = ir.VectorType(F32, LANES)

# Offsets in the FFI structs (x86-64/aarch64 LP64 layout of c_api.h).
CALL_FRAME_EXTENSION = 8
CALL_FRAME_STAGE = 32
CALL_FRAME_ARGS = 72      # args.args (void**)
CALL_FRAME_RETS = 112     # rets.rets (void**)
EXTENSION_TYPE = 8
EXTENSION_METADATA = 1    # XLA_FFI_Extension_Metadata
METADATA_EXTENSION_METADATA = 24
METADATA_API_VERSION = 8  # XLA_FFI_Api_Version inside XLA_FFI_Metadata
METADATA_TRAITS = 32
METADATA_STATE_TYPE = 40
BUFFER_DATA = 24
BUFFER_DIMS = 40
STAGE_EXECUTE = 3
FFI_API_MAJOR, FFI_API_MINOR = 0, 1  # the oldest typed FFI version that has every field used here


def _const(v):
    return ir.Constant(I64, v)


class _Loop:
    """`for i in range(start, stop, step)` over i64 with an alloca counter (mem2reg removes it)."""

    def __init__(self, b: ir.IRBuilder, start, stop, step, name):
        self.b, self.step = b, step
        fn = b.function
        self.var = b.alloca(I64, name=f"{name}.var")
        b.store(start, self.var)
        self.head = fn.append_basic_block(f"{name}.head")
        self.body = fn.append_basic_block(f"{name}.body")
        self.exit = fn.append_basic_block(f"{name}.exit")
        b.branch(self.head)
        b.position_at_end(self.head)
        self.index = b.load(self.var, name=name, typ=I64)
        b.cbranch(b.icmp_signed("<", self.index, stop), self.body, self.exit)
        b.position_at_end(self.body)

    def close(self):
        b = self.b
        b.store(b.add(self.index, self.step), self.var)
        b.branch(self.head)
        b.position_at_end(self.exit)


def _gep(b, base, index, typ=F32):
    return b.gep(base, [index], inbounds=True, source_etype=typ)


def _splat(b, value):
    undef = ir.Constant(VEC, ir.Undefined)
    one = b.insert_element(undef, value, ir.Constant(I32, 0))
    return b.shuffle_vector(one, undef, ir.Constant(ir.VectorType(I32, LANES), [0] * LANES))


def _subgroups(rows: int, size: int) -> list:
    return [list(range(r, min(r + size, rows))) for r in range(0, rows, size)]


def _kernel_function(module, name):
    """An internal void name(x, w, out, K, ldw, ldo, N), buffers not aliasing -> (function, builder)."""
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR, PTR, PTR, I64, I64, I64, I64]), name=name)
    fn.linkage = "internal"
    for a in fn.args[:3]:
        a.add_attribute("noalias")
    return fn, ir.IRBuilder(fn.append_basic_block("entry"))


def _kn_rows(module, fma, rows: int, sub: int) -> ir.Function:
    """kn_<rows>(x, w, out, K, ldw, ldo, N): `rows` rows of x times W (K, N); rows of W and of out
    are `ldw` and `ldo` floats apart; `sub` rows per register set."""
    fn, b = _kernel_function(module, f"kn_{rows}")
    x, w, out, k_dim, ldw, ldo, n_dim = fn.args
    zero = ir.Constant(VEC, [0.0] * LANES)
    chunks = _Loop(b, _const(0), k_dim, _const(K_CHUNK), "k0")
    first = b.icmp_signed("==", chunks.index, _const(0))
    tiles = _Loop(b, _const(0), n_dim, _const(LANES), "n")
    n = tiles.index
    for group in _subgroups(rows, sub):  # the W tile is read from memory once, then from L1
        out_ptrs = [_gep(b, out, b.add(b.mul(_const(r), ldo), n)) for r in group]
        acc = [b.select(first, zero, b.load(p, typ=VEC, align=4)) for p in out_ptrs]
        for kk in range(K_CHUNK):
            k = b.add(chunks.index, _const(kk))
            wv = b.load(_gep(b, w, b.add(b.mul(k, ldw), n)), typ=VEC, align=4)
            for i, r in enumerate(group):
                xs = b.load(_gep(b, x, b.add(b.mul(_const(r), k_dim), k)), typ=F32, align=4)
                acc[i] = b.call(fma, [_splat(b, xs), wv, acc[i]])
        for p, a in zip(out_ptrs, acc):
            b.store(a, p, align=4)
    tiles.close()
    chunks.close()
    b.ret_void()
    return fn


def _nk_rows(module, fma, reduce_add, rows: int, sub: int) -> ir.Function:
    """nk_<rows>(x, w, out, K, ldw, ldo, N): `rows` rows of x times W^T, W (N, K) (ldw = K), rows of
    out `ldo` floats apart; `sub` rows per register set."""
    fn, b = _kernel_function(module, f"nk_{rows}")
    x, w, out, k_dim, _, ldo, n_dim = fn.args
    zero = ir.Constant(VEC, [0.0] * LANES)
    accs = [b.alloca(VEC, name=f"acc{i}") for i in range(min(rows, sub) * W_ROWS)]
    outer = _Loop(b, _const(0), n_dim, _const(W_ROWS), "n")
    n = outer.index
    for g, group in enumerate(_subgroups(rows, sub)):  # W's rows are read from memory once, then from L1
        for a in accs:
            b.store(zero, a)
        inner = _Loop(b, _const(0), k_dim, _const(LANES), f"k{g}")
        k = inner.index
        wv = [b.load(_gep(b, w, b.add(b.mul(b.add(n, _const(j)), k_dim), k)), typ=VEC, align=4)
              for j in range(W_ROWS)]
        for i, r in enumerate(group):
            xv = b.load(_gep(b, x, b.add(b.mul(_const(r), k_dim), k)), typ=VEC, align=4)
            for j in range(W_ROWS):
                slot = accs[i * W_ROWS + j]
                b.store(b.call(fma, [xv, wv[j], b.load(slot, typ=VEC)]), slot)
        inner.close()
        for i, r in enumerate(group):
            for j in range(W_ROWS):
                total = b.call(reduce_add, [ir.Constant(F32, 0.0), b.load(accs[i * W_ROWS + j], typ=VEC)],
                               fastmath=("reassoc",))
                b.store(total, _gep(b, out, b.add(b.mul(_const(r), ldo), b.add(n, _const(j)))))
    outer.close()
    b.ret_void()
    return fn


def _pk_rows(module, fma, rows: int) -> ir.Function:
    """pk_<rows>(x, w, out, K, _, ldo, N): `rows` rows of x (K floats apart) times the packed W
    (tiles of K x PACK floats, one after the other) -> N columns of out, rows `ldo` floats apart;
    all rows in one register set."""
    fn, b = _kernel_function(module, f"pk_{rows}")
    x, w, out, k_dim, _, ldo, n_dim = fn.args
    vecs = PACK // LANES
    zero = ir.Constant(VEC, [0.0] * LANES)
    accs = [[b.alloca(VEC, name=f"acc{r}_{v}") for v in range(vecs)] for r in range(rows)]
    tiles = _Loop(b, _const(0), n_dim, _const(PACK), "n")
    n = tiles.index
    tile = b.mul(n, k_dim)  # tile n / PACK starts (n / PACK) * K * PACK floats in
    for row in accs:
        for a in row:
            b.store(zero, a)
    ks = _Loop(b, _const(0), k_dim, _const(1), "k")
    k = ks.index
    at = b.add(tile, b.mul(k, _const(PACK)))
    wv = [b.load(_gep(b, w, b.add(at, _const(v * LANES))), typ=VEC, align=4) for v in range(vecs)]
    for r in range(rows):
        xs = _splat(b, b.load(_gep(b, x, b.add(b.mul(_const(r), k_dim), k)), typ=F32, align=4))
        for v in range(vecs):
            b.store(b.call(fma, [xs, wv[v], b.load(accs[r][v], typ=VEC)]), accs[r][v])
    ks.close()
    for r in range(rows):
        for v in range(vecs):
            dst = _gep(b, out, b.add(b.mul(_const(r), ldo), b.add(n, _const(v * LANES))))
            b.store(b.load(accs[r][v], typ=VEC), dst, align=4)
    tiles.close()
    b.ret_void()
    return fn


def _pk_driver(module, name, kernels: list) -> ir.Function:
    """<name>(x, w, out, M, K, ldw, ldo, N) for the packed layout and any M: M rows in one
    register set when `kernels` (one per row count up to a register set's) has M; else, tile by
    tile, full register sets of rows then the rest, each rereading the tile from cache."""
    sets = _driver(module, f"{name}_sets", kernels)  # M <= len(kernels) rows in one register set
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR, PTR, PTR, I64, I64, I64, I64, I64]), name=name)
    fn.linkage = "internal"
    x, w, out, m_dim, k_dim, ldw, ldo, n_dim = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    sub = len(kernels)
    small_bb, big_bb, done = (fn.append_basic_block(n) for n in ("small", "big", "done"))
    b.cbranch(b.icmp_signed("<=", m_dim, _const(sub)), small_bb, big_bb)

    b.position_at_end(small_bb)
    b.call(sets, [x, w, out, m_dim, k_dim, ldw, ldo, n_dim])
    b.branch(done)

    b.position_at_end(big_bb)
    full = b.mul(b.udiv(m_dim, _const(sub)), _const(sub))
    tiles = _Loop(b, _const(0), n_dim, _const(PACK), "t")
    wt = _gep(b, w, b.mul(tiles.index, k_dim))
    groups = _Loop(b, _const(0), full, _const(sub), "g")
    r0 = groups.index
    b.call(kernels[-1], [_gep(b, x, b.mul(r0, k_dim)), wt, _gep(b, out, b.add(b.mul(r0, ldo), tiles.index)),
                         k_dim, ldw, ldo, _const(PACK)])
    groups.close()
    b.call(sets, [_gep(b, x, b.mul(full, k_dim)), wt, _gep(b, out, b.add(b.mul(full, ldo), tiles.index)),
                  b.sub(m_dim, full), k_dim, ldw, ldo, _const(PACK)])  # the rest (none: no case)
    tiles.close()
    b.branch(done)
    b.position_at_end(done)
    b.ret_void()
    return fn


def _driver(module, name, kernels: list) -> ir.Function:
    """<name>(x, w, out, M, K, ldw, ldo, N): the kernel specialised for M rows (M <= len(kernels))."""
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR, PTR, PTR, I64, I64, I64, I64, I64]), name=name)
    fn.linkage = "internal"
    x, w, out, m_dim, k_dim, ldw, ldo, n_dim = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    done = fn.append_basic_block("done")
    switch = b.switch(m_dim, done)
    for rows, kernel in enumerate(kernels, start=1):
        case = fn.append_basic_block(f"rows{rows}")
        switch.add_case(_const(rows), case)
        b.position_at_end(case)
        b.call(kernel, [x, w, out, k_dim, ldw, ldo, n_dim])
        b.branch(done)
    b.position_at_end(done)
    b.ret_void()
    return fn


def _load_ptr(b, base, offset):
    return b.load(_gep(b, base, _const(offset), ir.IntType(8)), typ=PTR, align=8)


# A product split in two column halves: the second half is offered to XLA's intra-op thread pool
# as a task while the calling thread computes the first. The task's record lives on the heap,
# freed by whichever side lets go of it last: the caller takes the half back if no pool thread
# has claimed it by the time its own half is done, so nothing waits on a busy or absent pool.
PART_X, PART_W, PART_OUT, PART_M, PART_K, PART_LDW, PART_LDO, PART_N = (8 * i for i in range(8))
PART_STATE, PART_REFS, PART_SIZE = 64, 68, 72   # state: 0 free, 1 claimed, 2 done
API_ERROR_DESTROY, API_THREADPOOL_SCHEDULE = 64, 136   # offsets in XLA_FFI_Api
CALL_FRAME_API, CALL_FRAME_CTX = 16, 24


def _i32(v):
    return ir.Constant(I32, v)


def _field(b, record, offset, typ):
    return b.load(_gep(b, record, _const(offset), ir.IntType(8)), typ=typ, align=8 if typ != I32 else 4)


def _run_part(b, driver, record):
    b.call(driver, [_field(b, record, o, t) for o, t in ((PART_X, PTR), (PART_W, PTR), (PART_OUT, PTR), (PART_M, I64),
                                                         (PART_K, I64), (PART_LDW, I64), (PART_LDO, I64),
                                                         (PART_N, I64))])


def _release(b, free, record):
    """Drop one reference to the record; the last one frees it."""
    fn = b.function
    refs = _gep(b, record, _const(PART_REFS), ir.IntType(8))
    left = b.atomic_rmw("sub", refs, _i32(1), "acq_rel")
    last_bb, after_bb = fn.append_basic_block("last"), fn.append_basic_block("after")
    b.cbranch(b.icmp_unsigned("==", left, _i32(1)), last_bb, after_bb)
    b.position_at_end(last_bb)
    b.call(free, [record])
    b.branch(after_bb)
    b.position_at_end(after_bb)


def _claim(b, record):
    """-> i1: this side moved the record from free to claimed."""
    state = _gep(b, record, _const(PART_STATE), ir.IntType(8))
    pair = b.cmpxchg(state, _i32(0), _i32(1), "acq_rel", "acquire")
    return b.extract_value(pair, 1)


def _task(module, name, driver, free) -> ir.Function:
    """<name>(record): the pool's side of a split product."""
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR]), name=name)
    fn.linkage = "internal"
    record = fn.args[0]
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    run_bb, out_bb = fn.append_basic_block("run"), fn.append_basic_block("out")
    b.cbranch(_claim(b, record), run_bb, out_bb)
    b.position_at_end(run_bb)
    _run_part(b, driver, record)
    b.atomic_rmw("xchg", _gep(b, record, _const(PART_STATE), ir.IntType(8)), _i32(2), "release")
    b.branch(out_bb)
    b.position_at_end(out_bb)
    _release(b, free, record)
    b.ret_void()
    return fn


def ffi_entry(module, name):
    """An XLA FFI handler `name`(call_frame) -> error (always null) that answers XLA's metadata
    query and ignores every stage but execute -> (function, builder positioned in the execute
    block, call frame, the block that returns). The caller emits the execute block and branches
    to the returned block."""
    fn = ir.Function(module, ir.FunctionType(PTR, [PTR]), name=name)
    frame = fn.args[0]
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    null = ir.Constant(PTR, None)
    i8 = ir.IntType(8)
    metadata_bb, run_bb, exec_bb, done_bb = (fn.append_basic_block(n) for n in ("metadata", "run", "exec", "done"))
    extension = _load_ptr(b, frame, CALL_FRAME_EXTENSION)
    b.cbranch(b.icmp_unsigned("!=", extension, null), metadata_bb, run_bb)

    b.position_at_end(metadata_bb)  # XLA asks which FFI version the handler speaks
    ext_type = b.load(_gep(b, extension, _const(EXTENSION_TYPE), i8), typ=I32, align=4)
    fill_bb = fn.append_basic_block("fill")
    b.cbranch(b.icmp_unsigned("==", ext_type, _i32(EXTENSION_METADATA)), fill_bb, done_bb)
    b.position_at_end(fill_bb)
    metadata = _load_ptr(b, extension, METADATA_EXTENSION_METADATA)
    version = _gep(b, metadata, _const(METADATA_API_VERSION), i8)
    b.store(_const(24), version, align=8)                                    # struct_size
    b.store(null, _gep(b, version, _const(8), i8), align=8)                  # extension_start
    b.store(_i32(FFI_API_MAJOR), _gep(b, version, _const(16), i8), align=4)
    b.store(_i32(FFI_API_MINOR), _gep(b, version, _const(20), i8), align=4)
    b.store(_i32(0), _gep(b, metadata, _const(METADATA_TRAITS), i8), align=4)
    b.store(_const(0), _gep(b, metadata, _const(METADATA_STATE_TYPE), i8), align=8)
    b.branch(done_bb)

    b.position_at_end(run_bb)
    stage = b.load(_gep(b, frame, _const(CALL_FRAME_STAGE), i8), typ=I32, align=4)
    b.cbranch(b.icmp_unsigned("==", stage, _i32(STAGE_EXECUTE)), exec_bb, done_bb)

    b.position_at_end(done_bb)
    b.ret(null)
    b.position_at_end(exec_bb)
    return fn, b, frame, done_bb


def _handler(module, name, driver, task, layout: str, runtime) -> ir.Function:
    """XLA FFI handler `name`: (x, w) -> out by `driver`."""
    malloc, free, pause = runtime
    fn, b, frame, done_bb = ffi_entry(module, name)
    null = ir.Constant(PTR, None)
    i8 = ir.IntType(8)
    args = _load_ptr(b, frame, CALL_FRAME_ARGS)
    rets = _load_ptr(b, frame, CALL_FRAME_RETS)
    x_buf = b.load(args, typ=PTR, align=8)
    w_buf = b.load(_gep(b, args, _const(1), PTR), typ=PTR, align=8)
    out_buf = b.load(rets, typ=PTR, align=8)
    x_dims = _load_ptr(b, x_buf, BUFFER_DIMS)
    w_dims = _load_ptr(b, w_buf, BUFFER_DIMS)
    m_dim = b.load(x_dims, typ=I64, align=8)
    k_dim = b.load(_gep(b, x_dims, _const(1), I64), typ=I64, align=8)
    x_data, w_data, out_data = (_load_ptr(b, buf, BUFFER_DATA) for buf in (x_buf, w_buf, out_buf))
    if layout == "kn":
        n_dim = b.load(_gep(b, w_dims, _const(1), I64), typ=I64, align=8)
        ldw, step = n_dim, LANES
    elif layout == "packed":  # W (N / PACK, K, PACK)
        n_dim = b.mul(b.load(w_dims, typ=I64, align=8), _const(PACK))
        ldw, step = k_dim, PACK
    else:
        n_dim = b.load(w_dims, typ=I64, align=8)
        ldw, step = k_dim, W_ROWS
    half = b.mul(b.udiv(b.udiv(n_dim, _const(step)), _const(2)), _const(step))  # columns of the first part
    whole_bb, split_bb = fn.append_basic_block("whole"), fn.append_basic_block("split")
    b.cbranch(b.icmp_unsigned("==", half, _const(0)), whole_bb, split_bb)

    b.position_at_end(whole_bb)
    b.call(driver, [x_data, w_data, out_data, m_dim, k_dim, ldw, n_dim, n_dim])
    b.branch(done_bb)

    b.position_at_end(split_bb)
    record = b.call(malloc, [_const(PART_SIZE)])
    w_second = _gep(b, w_data, half if layout == "kn" else b.mul(half, k_dim))
    for offset, value in ((PART_X, x_data), (PART_W, w_second), (PART_OUT, _gep(b, out_data, half)), (PART_M, m_dim),
                          (PART_K, k_dim), (PART_LDW, ldw), (PART_LDO, n_dim), (PART_N, b.sub(n_dim, half))):
        b.store(value, _gep(b, record, _const(offset), i8), align=8)
    b.store(_i32(0), _gep(b, record, _const(PART_STATE), i8), align=4)
    b.store(_i32(2), _gep(b, record, _const(PART_REFS), i8), align=4)
    api = _load_ptr(b, frame, CALL_FRAME_API)
    schedule = _load_ptr(b, api, API_THREADPOOL_SCHEDULE)
    sargs = _words(b, [_const(40), null, _load_ptr(b, frame, CALL_FRAME_CTX), task, record])
    # (XLA_FFI_ThreadPool_Schedule_Args: struct_size, extension_start, ctx, task, data)
    error = _call_ptr(b, schedule, PTR, [sargs])
    failed_bb, mine_bb = fn.append_basic_block("no_pool"), fn.append_basic_block("mine")
    b.cbranch(b.icmp_unsigned("!=", error, null), failed_bb, mine_bb)

    b.position_at_end(failed_bb)  # no pool: drop the task's reference and destroy the error
    destroy = _load_ptr(b, api, API_ERROR_DESTROY)
    dargs = _words(b, [_const(24), null, error])  # XLA_FFI_Error_Destroy_Args
    _call_ptr(b, destroy, ir.VoidType(), [dargs])
    b.store(_i32(1), _gep(b, record, _const(PART_REFS), i8), align=4)
    b.branch(mine_bb)

    b.position_at_end(mine_bb)
    b.call(driver, [x_data, w_data, out_data, m_dim, k_dim, ldw, n_dim, half])
    steal_bb, wait_bb, spin_bb, finish_bb = (fn.append_basic_block(n) for n in ("steal", "wait", "spin", "finish"))
    b.cbranch(_claim(b, record), steal_bb, wait_bb)
    b.position_at_end(steal_bb)   # nobody took the second half: compute it here
    _run_part(b, driver, record)
    b.branch(finish_bb)
    b.position_at_end(wait_bb)
    state = b.atomic_rmw("or", _gep(b, record, _const(PART_STATE), i8), _i32(0), "acquire")
    b.cbranch(b.icmp_unsigned("==", state, _i32(2)), finish_bb, spin_bb)
    b.position_at_end(spin_bb)
    b.call(pause, [])
    b.branch(wait_bb)
    b.position_at_end(finish_bb)
    _release(b, free, record)
    b.branch(done_bb)
    return fn


def _words(b, values):
    """A stack struct of 8-byte fields (pointers stored as integers) -> its address."""
    slots = b.alloca(ir.ArrayType(I64, len(values)))
    for i, value in enumerate(values):
        word = value if value.type == I64 else b.ptrtoint(value, I64)
        b.store(word, b.gep(slots, [_i32(0), _i32(i)], inbounds=True), align=8)
    return slots


def _call_ptr(b, pointer, result, args):
    """Call a C function through a pointer: result f(ptr...)."""
    fnty = ir.FunctionType(result, [a.type for a in args])
    return b.call(b.inttoptr(b.ptrtoint(pointer, I64), fnty.as_pointer()), args)


def build_module(max_rows: int, kn_sub: int, nk_sub: int, pk_sub: int, triple: str, data_layout: str) -> ir.Module:
    """The module with the handlers `jetspec_matmul_kn` and `jetspec_matmul_nk` (1..max_rows rows)
    and `jetspec_matmul_packed` (any number of rows, `pk_sub` per register set)."""
    module = ir.Module(name="jetspec_cpu_matmul")
    module.triple, module.data_layout = triple, data_layout
    fma = ir.Function(module, ir.FunctionType(VEC, [VEC, VEC, VEC]), name="llvm.fma.v16f32")
    reduce_add = ir.Function(module, ir.FunctionType(F32, [F32, VEC]), name="llvm.vector.reduce.fadd.v16f32")
    malloc = ir.Function(module, ir.FunctionType(PTR, [I64]), name="malloc")
    free = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR]), name="free")
    spin = "pause" if triple.startswith(("x86_64", "i686")) else "yield"
    pause = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), spin, "", side_effect=True)
    rows = range(1, max_rows + 1)
    for layout, make in (("kn", lambda r: _kn_rows(module, fma, r, kn_sub)),
                         ("nk", lambda r: _nk_rows(module, fma, reduce_add, r, nk_sub))):
        driver = _driver(module, layout, [make(r) for r in rows])
        task = _task(module, f"{layout}_task", driver, free)
        _handler(module, f"jetspec_matmul_{layout}", driver, task, layout, (malloc, free, pause))
    driver = _pk_driver(module, "packed", [_pk_rows(module, fma, r) for r in range(1, pk_sub + 1)])
    task = _task(module, "packed_task", driver, free)
    _handler(module, "jetspec_matmul_packed", driver, task, "packed", (malloc, free, pause))
    return module
