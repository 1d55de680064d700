"""LLVM IR of tree attention for a few query rows on CPU: the handler `jetspec_tree_attention`.

Same contract as `kernels/tree_attn` (`tree_attention_reference`): q (B, N, Hq, D); k, v (B, Hkv, S, D)
holding the N new rows at [lengths[b], lengths[b] + N); lengths (B,) int32; tree_mask (B, N, N)
bool; scale () float32 -> out (B, N, Hq, D) float32. Query row (n, head h*G + g) sees the keys
[0, lengths[b]) and the new rows its tree-mask row allows; no slot at or past lengths[b] + N is
read.

XLA:CPU runs the same attention as a dozen small ops per layer (a window slice, a batched dot, a
masked softmax, a second dot, a NaN guard), each paying its own dispatch (on our development
machine an AR step takes 22.8 ms with this kernel, 24.6 ms with XLA's; a 4-node round 29.5 against
33.5 ms: scripts/profile_round.py, docs/bench/round-profile). Here one call
does it all, per (row b, KV head h, query row): pass 1 writes each visible key's score q.k * scale
(a vector product over D, reduced in a fixed order) to a buffer, -inf for the others, and takes
their max; pass 2 exponentiates the buffer 16 scores at a time (a Cephes-style polynomial, ~1 ulp)
and sums them; pass 3 accumulates p_j * v_j over the keys in slot order and divides by the sum.
The code is specialised for each head dimension in `HEAD_DIMS` (the q row and the output
accumulators stay in registers).
"""

from __future__ import annotations

import math

from llvmlite import ir

from jetspec_jax.kernels.cpu_matmul import ATTENTION_TARGET as TARGET
from jetspec_jax.kernels.cpu_matmul import HEAD_DIMS, LANES
from jetspec_jax.kernels.cpu_matmul.codegen import (BUFFER_DATA, BUFFER_DIMS, CALL_FRAME_ARGS, CALL_FRAME_RETS, F32,
                                                    I64, PTR, VEC, _const, _gep, _Loop, _load_ptr, _splat, ffi_entry)

I8 = ir.IntType(8)
I32V = ir.VectorType(ir.IntType(32), LANES)
# Cephes expf: exp(x) = 2^n * e^r, n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts), e^r by a
# degree-5 polynomial. Inputs below EXP_MIN are clamped (their exponential is below 1.2e-38).
EXP_MIN = -87.33654
LOG2E = 1.44269504088896341
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _vconst(value):
    return ir.Constant(VEC, [float(value)] * LANES)


def _vexp(b, x, floor, maxnum):
    """exp of a float vector (finite or -inf lanes; the caller zeroes the -inf ones)."""
    x = b.call(maxnum, [x, _vconst(EXP_MIN)])
    n = b.call(floor, [b.fadd(b.fmul(x, _vconst(LOG2E)), _vconst(0.5))])
    r = b.fsub(b.fsub(x, b.fmul(n, _vconst(LN2_HI))), b.fmul(n, _vconst(LN2_LO)))
    y = _vconst(EXP_POLY[0])
    for c in EXP_POLY[1:]:
        y = b.fadd(b.fmul(y, r), _vconst(c))
    y = b.fadd(b.fadd(b.fmul(y, b.fmul(r, r)), r), _vconst(1.0))
    bits = b.shl(b.add(b.fptosi(n, I32V), ir.Constant(I32V, [127] * LANES)), ir.Constant(I32V, [23] * LANES))
    return b.fmul(y, b.bitcast(bits, VEC))


def _row_function(module, d: int, fma, reduce_add, floor, maxnum, maxnum_v) -> ir.Function:
    """attn_<d>(q, k, v, mask, L, T, scale, out, buf): one query row (q, out: D floats) over the
    keys [0, T) of one KV head (k, v: rows of D floats); keys >= L are visible where mask[j - L]
    (bytes) is nonzero. buf holds T rounded up to LANES floats."""
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR, PTR, PTR, PTR, I64, I64, F32, PTR, PTR]),
                     name=f"attn_{d}")
    fn.linkage = "internal"
    q, k, v, mask, length, total, scale, out, buf = fn.args
    for a in (q, k, v, mask, out, buf):
        a.add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    nvec = d // LANES
    minus_inf = ir.Constant(F32, -math.inf)
    best = b.alloca(F32, name="best")  # every alloca in the entry block, where mem2reg lifts it
    total_acc = b.alloca(VEC, name="sum")
    accs = [b.alloca(VEC, name=f"o{i}") for i in range(nvec)]
    qv = [b.load(_gep(b, q, _const(i * LANES)), typ=VEC, align=4) for i in range(nvec)]
    b.store(minus_inf, best)

    def score(j):
        row = b.mul(j, _const(d))
        acc = None
        for i in range(nvec):
            kv = b.load(_gep(b, k, b.add(row, _const(i * LANES))), typ=VEC, align=4)
            acc = b.fmul(qv[i], kv) if acc is None else b.call(fma, [qv[i], kv, acc])
        return b.fmul(b.call(reduce_add, [ir.Constant(F32, 0.0), acc], fastmath=("reassoc",)), scale)

    # Pass 1: scores of the committed keys (all visible), then of the tree's (where the mask allows).
    prefix = _Loop(b, _const(0), length, _const(1), "p")
    s = score(prefix.index)
    b.store(s, _gep(b, buf, prefix.index))
    b.store(b.call(maxnum, [b.load(best, typ=F32), s]), best)
    prefix.close()
    tree = _Loop(b, length, total, _const(1), "t")
    seen = b.icmp_unsigned("!=", b.load(_gep(b, mask, b.sub(tree.index, length), I8), typ=I8), ir.Constant(I8, 0))
    s = b.select(seen, score(tree.index), minus_inf)
    b.store(s, _gep(b, buf, tree.index))
    b.store(b.call(maxnum, [b.load(best, typ=F32), s]), best)
    tree.close()
    padded = b.mul(b.udiv(b.add(total, _const(LANES - 1)), _const(LANES)), _const(LANES))
    pad = _Loop(b, total, padded, _const(1), "pad")
    b.store(minus_inf, _gep(b, buf, pad.index))
    pad.close()

    # Pass 2: p_j = exp(s_j - max), 0 where s_j = -inf; their sum.
    top = _splat(b, b.load(best, typ=F32))
    b.store(ir.Constant(VEC, [0.0] * LANES), total_acc)
    blocks = _Loop(b, _const(0), padded, _const(LANES), "e")
    ptr = _gep(b, buf, blocks.index)
    sv = b.load(ptr, typ=VEC, align=4)
    p = _vexp(b, b.fsub(sv, top), floor, maxnum_v)
    p = b.select(b.fcmp_ordered("==", sv, _vconst(-math.inf)), _vconst(0.0), p)
    b.store(p, ptr, align=4)
    b.store(b.fadd(b.load(total_acc, typ=VEC), p), total_acc)
    blocks.close()
    denom = b.call(reduce_add, [ir.Constant(F32, 0.0), b.load(total_acc, typ=VEC)], fastmath=("reassoc",))

    # Pass 3: sum_j p_j v_j in slot order, then / sum.
    for a in accs:
        b.store(ir.Constant(VEC, [0.0] * LANES), a)
    keys = _Loop(b, _const(0), total, _const(1), "v")
    pj = _splat(b, b.load(_gep(b, buf, keys.index), typ=F32))
    row = b.mul(keys.index, _const(d))
    for i, a in enumerate(accs):
        vv = b.load(_gep(b, v, b.add(row, _const(i * LANES))), typ=VEC, align=4)
        b.store(b.call(fma, [pj, vv, b.load(a, typ=VEC)]), a)
    keys.close()
    dv = _splat(b, denom)
    for i, a in enumerate(accs):
        b.store(b.fdiv(b.load(a, typ=VEC), dv), _gep(b, out, _const(i * LANES)), align=4)
    b.ret_void()
    return fn


def build_attention(module) -> ir.Function:
    """Add the handler `TARGET` (and its per-head-dimension row functions) to `module`, the one
    `codegen.build_module` made (its fma, reduction, malloc and free declarations are reused)."""
    fma, reduce_add = module.globals["llvm.fma.v16f32"], module.globals["llvm.vector.reduce.fadd.v16f32"]
    malloc, free = module.globals["malloc"], module.globals["free"]
    floor = ir.Function(module, ir.FunctionType(VEC, [VEC]), name="llvm.floor.v16f32")
    maxnum = ir.Function(module, ir.FunctionType(F32, [F32, F32]), name="llvm.maxnum.f32")
    maxnum_v = ir.Function(module, ir.FunctionType(VEC, [VEC, VEC]), name="llvm.maxnum.v16f32")
    rows = {d: _row_function(module, d, fma, reduce_add, floor, maxnum, maxnum_v) for d in HEAD_DIMS}

    fn, b, frame, done_bb = ffi_entry(module, TARGET)
    args = _load_ptr(b, frame, CALL_FRAME_ARGS)
    rets = _load_ptr(b, frame, CALL_FRAME_RETS)
    bufs = [b.load(_gep(b, args, _const(i), PTR), typ=PTR, align=8) for i in range(6)]
    q, k, v, lengths, mask, scale = (_load_ptr(b, buf, BUFFER_DATA) for buf in bufs)
    out = _load_ptr(b, b.load(rets, typ=PTR, align=8), BUFFER_DATA)
    q_dims, k_dims = _load_ptr(b, bufs[0], BUFFER_DIMS), _load_ptr(b, bufs[1], BUFFER_DIMS)
    batch, n_rows, hq, d = (b.load(_gep(b, q_dims, _const(i), I64), typ=I64, align=8) for i in range(4))
    hkv, slots = (b.load(_gep(b, k_dims, _const(i), I64), typ=I64, align=8) for i in (1, 2))
    group = b.udiv(hq, hkv)
    scale = b.load(scale, typ=F32, align=4)
    scratch = b.call(malloc, [b.mul(b.add(slots, _const(LANES)), _const(4))])

    rows_b = _Loop(b, _const(0), batch, _const(1), "b")
    bi = rows_b.index
    length = b.sext(b.load(_gep(b, lengths, bi, ir.IntType(32)), typ=ir.IntType(32), align=4), I64)
    total = b.add(length, n_rows)
    total = b.select(b.icmp_signed("<", total, slots), total, slots)  # the contract says <= S already
    heads = _Loop(b, _const(0), hkv, _const(1), "h")
    hi = heads.index
    cache_row = b.mul(b.mul(b.add(b.mul(bi, hkv), hi), slots), d)
    k_head, v_head = _gep(b, k, cache_row), _gep(b, v, cache_row)
    queries = _Loop(b, _const(0), n_rows, _const(1), "n")
    ni = queries.index
    mask_row = _gep(b, mask, b.mul(b.add(b.mul(bi, n_rows), ni), n_rows), I8)
    members = _Loop(b, _const(0), group, _const(1), "g")
    head = b.add(b.mul(hi, group), members.index)
    offset = b.mul(b.add(b.mul(b.add(b.mul(bi, n_rows), ni), hq), head), d)
    q_row, out_row = _gep(b, q, offset), _gep(b, out, offset)
    after = b.function.append_basic_block("row_done")
    switch = b.switch(d, after)
    for dim, row_fn in rows.items():
        case = b.function.append_basic_block(f"d{dim}")
        switch.add_case(_const(dim), case)
        b.position_at_end(case)
        b.call(row_fn, [q_row, k_head, v_head, mask_row, length, total, scale, out_row, scratch])
        b.branch(after)
    b.position_at_end(after)
    members.close()
    queries.close()
    heads.close()
    rows_b.close()
    b.call(free, [scratch])
    b.branch(done_bb)
    return fn
