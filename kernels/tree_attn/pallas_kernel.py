"""Pallas (Triton) tree attention: N new queries over a KV cache that already holds their K/V.

Layout. Every program owns one (batch row b, KV head h, block of query rows, prefix split).
Query heads that share a KV head are packed into the rows of one block, row r = n * G + g for
tree query n and query head h * G + g, so each K/V block is read once for the whole group (GQA).

Two loops per program, both with online softmax in float32:
  1. the committed prefix, slots [0, lengths[b]), in blocks of `block_k`. The trip count comes
     from lengths[b] (a runtime value), not from the cache size S, so a long cache costs nothing
     past the used prefix. With `kv_splits` > 1 the prefix blocks are shared out over programs
     (flash-decoding) so that N = 1 decoding still fills the GPU.
  2. the N tree keys, slots [lengths[b], lengths[b] + N), under the ancestor mask; only the last
     split does this.
Each program writes its unnormalised partial state (acc, max, sum); `_combine` merges the splits.

Slots at >= lengths[b] + N are never fetched: every K/V load is masked and masked rows read as 0,
so NaN garbage in unused slots cannot leak in through 0 * NaN.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Finite stand-in for -inf in masked scores: exp(-inf - (-inf)) would be NaN in the first block.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Triton's tl.dot needs every matrix dimension >= 16; Triton tensors need power-of-2 sizes.
_MIN_BLOCK = 16
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Programs a call should launch at least: 2 per SM of a 132-SM H100/H200, so that one batch row's
# verify (B = 1) keeps every SM busy while another program waits on memory.
MIN_PROGRAMS = 264


def _is_power_of_2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Static tiling; changing any field recompiles.

    block_rows: query rows (tree query x query head in the group) per program.
    block_k: cache slots per step of the prefix loop (the tree loop uses at most this).
    kv_splits: programs sharing one row block's prefix (1 = no split).
    num_warps: Triton warps per program; None picks 4 for head_dim <= 64, else 8.
    num_stages: Triton software-pipelining depth of the K/V loads.
    """

    block_rows: int = 64
    block_k: int = 64
    kv_splits: int = 1
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_rows", "block_k"):
            size = getattr(self, name)
            if not (_is_power_of_2(size) and size >= _MIN_BLOCK):
                raise ValueError(f"{name} must be a power of 2 >= {_MIN_BLOCK}, got {size}")
        if self.kv_splits < 1:
            raise ValueError(f"kv_splits must be >= 1, got {self.kv_splits}")


def default_block_sizes(batch: int, num_queries: int, num_heads: int, num_kv_heads: int, num_slots: int,
                        min_programs: int = MIN_PROGRAMS) -> BlockSizes:
    """The tiling `tree_attention_pallas` uses unless told: up to 64 rows per block, 64-slot K/V
    steps, and the prefix split over as many programs (flash-decoding) as it takes to launch
    `min_programs`, but no more splits than the cache has 64-slot blocks.

    Worked example, Qwen3-8B (32 query / 8 KV heads) at B = 1, N = 16, S = 8192: 16 x 4 = 64 rows
    -> 1 row block per KV head -> 8 programs unsplit -> 33 splits -> 264 programs. At N = 256:
    1024 rows -> 16 row blocks -> 128 programs -> 3 splits -> 384 programs.
    """
    defaults = BlockSizes()
    rows = num_queries * (num_heads // num_kv_heads)
    block_rows = max(_MIN_BLOCK, min(defaults.block_rows, pl.next_power_of_2(rows)))
    programs = batch * num_kv_heads * pl.cdiv(rows, block_rows)
    splits = min(pl.cdiv(min_programs, programs), pl.cdiv(num_slots, defaults.block_k))
    return dataclasses.replace(defaults, block_rows=block_rows, kv_splits=max(1, splits))


def _load_rows(ref, start, num_rows: int, valid):
    """Rows [start, start + num_rows) of ref (S, D) -> (num_rows, D); rows not `valid` are 0.

    The mask keeps the load from touching those rows at all (on GPU they may lie past the end
    of the cache), and `other=0` makes them exact zeros rather than whatever the slot holds.
    """
    return plgpu.load(ref.at[pl.ds(start, num_rows), :], mask=valid[:, None], other=0.0)


def _attend(carry, q, k, v, visible, *, scale: float, precision):
    """One online-softmax step (FlashAttention-2, unnormalised accumulator).

    carry = (acc (R, D) f32, m (R,) f32 running max, l (R,) f32 running sum);
    q (R, D); k, v (Bk, D), zero where not loaded; visible (R, Bk) bool -> new carry.
    """
    acc, m, l = carry
    s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale  # (R, Bk) f32
    s = jnp.where(visible, s, _MASK_VALUE)
    m_next = jnp.maximum(m, s.max(axis=-1))  # (R,)
    correction = jnp.exp(m - m_next)  # (R,); 0 on the first step (m = -inf)
    # Zero masked keys explicitly: in a block where a row sees nothing, m_next is the mask value
    # and exp(s - m_next) = 1 for every masked key. A later visible key would rescale those to 0,
    # but a row that sees no slot at all must end with l = 0 (NaN out, as in the reference).
    p = jnp.where(visible, jnp.exp(s - m_next[:, None]), 0.0)  # (R, Bk) f32
    l_next = correction * l + p.sum(axis=-1)
    pv = plgpu.dot(p.astype(v.dtype), v, precision=precision)  # (R, D) f32
    return correction[:, None] * acc + pv, m_next, l_next


def _prefix_pass(carry, q, k_ref, v_ref, length, split, *, block_k: int, kv_splits: int, attend):
    """Attend to this split's share of the committed prefix, slots [0, length).

    Every query sees every committed slot, so only the length bounds the mask. The trip count
    is computed from `length`, never from the cache size.
    """
    block_rows = q.shape[0]
    num_blocks = lax.div(length + (block_k - 1), block_k)
    per_split = lax.div(num_blocks + (kv_splits - 1), kv_splits)
    first = split * per_split
    last = jnp.minimum(first + per_split, num_blocks)  # first >= last: nothing to do

    def step(j, carry):
        slot = j * block_k + jnp.arange(block_k, dtype=jnp.int32)  # (Bk,)
        in_prefix = slot < length
        k = _load_rows(k_ref, j * block_k, block_k, in_prefix)  # (Bk, D)
        v = _load_rows(v_ref, j * block_k, block_k, in_prefix)  # (Bk, D)
        visible = jnp.broadcast_to(in_prefix[None, :], (block_rows, block_k))
        return attend(carry, q, k, v, visible)

    return lax.fori_loop(first, last, step, carry)


def _tree_pass(carry, q, k_ref, v_ref, tree_mask_ref, length, query, *, tree_block: int, attend):
    """Attend to the N tree keys, slots [length, length + N), under the ancestor mask.

    query (R,) int32: the tree query of each row of q.
    """
    num_nodes = tree_mask_ref.shape[0]
    num_slots = k_ref.shape[0]

    def step(t, carry):
        node = t * tree_block + jnp.arange(tree_block, dtype=jnp.int32)  # (Bt,)
        # `length + node < num_slots` only matters if a caller breaks lengths + N <= S: it keeps
        # the GPU from reading past the buffer.
        loadable = (node < num_nodes) & (length + node < num_slots)
        k = _load_rows(k_ref, length + t * tree_block, tree_block, loadable)  # (Bt, D)
        v = _load_rows(v_ref, length + t * tree_block, tree_block, loadable)  # (Bt, D)
        # A gather: row r reads mask row query[r]; indices are clamped so every read is in bounds.
        ancestor = tree_mask_ref[query[:, None], jnp.minimum(node, num_nodes - 1)[None, :]]  # (R, Bt)
        return attend(carry, q, k, v, ancestor & loadable[None, :])

    return lax.fori_loop(0, pl.cdiv(num_nodes, tree_block), step, carry)


def _tree_attention_kernel(
    lengths_ref,  # () int32: committed prefix length of this batch row
    tree_mask_ref,  # (N, N) bool: query i sees tree node j iff [i, j]
    q_ref,  # (block_rows, D): row r = n * G + g of this row block
    k_ref,  # (S, D): this KV head's cache; the tree's keys sit at [length, length + N)
    v_ref,  # (S, D)
    acc_ref,  # (block_rows, D) f32: unnormalised output of this split
    m_ref,  # (block_rows,) f32: running max of this split
    l_ref,  # (block_rows,) f32: softmax denominator of this split
    *,
    group: int,
    block_k: int,
    tree_block: int,
    kv_splits: int,
    scale: float,
    precision,
):
    num_nodes = tree_mask_ref.shape[0]
    block_rows, head_dim = q_ref.shape
    length = lengths_ref[()]
    split = pl.program_id(3)
    attend = functools.partial(_attend, scale=scale, precision=precision)

    q = q_ref[...]  # (block_rows, D)
    carry = (
        jnp.zeros((block_rows, head_dim), jnp.float32),
        jnp.full((block_rows,), -jnp.inf, jnp.float32),
        jnp.zeros((block_rows,), jnp.float32),
    )
    carry = _prefix_pass(carry, q, k_ref, v_ref, length, split, block_k=block_k, kv_splits=kv_splits, attend=attend)

    # Padding rows (r >= N * G) borrow the last query's mask row; their output is dropped.
    row = pl.program_id(2) * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
    query = jnp.minimum(lax.div(row, group), num_nodes - 1)  # (block_rows,)
    acc, m, l = lax.cond(
        split == kv_splits - 1,  # the tree is attended once, by the last split
        lambda c: _tree_pass(c, q, k_ref, v_ref, tree_mask_ref, length, query, tree_block=tree_block, attend=attend),
        lambda c: c,
        carry,
    )
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _combine(acc, m, l):
    """Merge prefix splits: acc (P, B, H, R, D), m, l (P, B, H, R) -> (B, H, R, D) f32.

    A split that saw nothing has m = -inf, l = 0, acc = 0 and gets weight exp(-inf) = 0.
    """
    m_all = m.max(axis=0)
    weight = jnp.exp(m - m_all)  # (P, B, H, R)
    numerator = (weight[..., None] * acc).sum(axis=0)
    return numerator / (weight * l).sum(axis=0)[..., None]


def _to_rows(x, num_kv_heads: int, padded_rows: int):
    """(B, N, Hq, D) -> (B, Hkv, padded_rows, D) with row n * G + g = query n, head kv * G + g.

    Extra rows are zeros; the query tensor is small next to the cache, so this copy is cheap.
    """
    b, n, hq, d = x.shape
    g = hq // num_kv_heads
    x = x.reshape(b, n, num_kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, num_kv_heads, n * g, d)
    return jnp.pad(x, ((0, 0), (0, 0), (0, padded_rows - n * g), (0, 0)))


def _from_rows(x, num_queries: int, num_heads: int):
    """Inverse of `_to_rows`: (B, Hkv, padded_rows, D) -> (B, N, Hq, D)."""
    b, hkv, _, d = x.shape
    g = num_heads // hkv
    x = x[:, :, : num_queries * g].reshape(b, hkv, num_queries, g, d)
    return x.transpose(0, 2, 1, 3, 4).reshape(b, num_queries, num_heads, d)


def _check_supported(q, k, v, lengths, tree_mask):
    """ValueError for inputs that break the contract; NotImplementedError for valid inputs this
    kernel does not cover (the API then falls back to XLA)."""
    b, n, hq, d = q.shape
    if k.shape != v.shape or k.ndim != 4 or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k, v must be (B, Hkv, S, D) matching q {q.shape}; got {k.shape}, {v.shape}")
    if hq % k.shape[1]:
        raise ValueError(f"query heads {hq} are not a multiple of KV heads {k.shape[1]}")
    if tree_mask.shape != (b, n, n) or tree_mask.dtype != jnp.bool_:
        raise ValueError(
            f"tree_mask must be bool (B, N, N) = {(b, n, n)}; got {tree_mask.dtype} {tree_mask.shape}"
        )
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be (B,) = ({b},); got {lengths.shape}")
    if not (_is_power_of_2(d) and d >= _MIN_BLOCK):
        raise NotImplementedError(f"head_dim {d}: the Triton kernel needs a power of 2 >= {_MIN_BLOCK}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise NotImplementedError(
            f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: need all float32, bfloat16 or float16"
        )


def pallas_supports(q, k, v, lengths, tree_mask) -> bool:
    """Whether the kernel covers these inputs; ValueError if they break the contract."""
    try:
        _check_supported(q, k, v, lengths, tree_mask)
    except NotImplementedError:
        return False
    return True


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def tree_attention_pallas(
    q, k, v, lengths, tree_mask, *, block_sizes: BlockSizes | None = None, interpret: bool = False
):
    """Pallas tree attention; same contract as `tree_attention_reference`.

    q (B, N, Hq, D); k, v (B, Hkv, S, D) holding the tree's own K/V at [lengths, lengths + N);
    lengths (B,) int32 with lengths + N <= S; tree_mask (B, N, N) bool -> (B, N, Hq, D) q.dtype.
    block_sizes: the tiling; None picks `default_block_sizes` for these shapes.
    `interpret=True` runs the kernel body with XLA (CPU tests); otherwise it compiles with Triton.
    """
    _check_supported(q, k, v, lengths, tree_mask)
    b, n, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if block_sizes is None:
        block_sizes = default_block_sizes(b, n, hq, hkv, s)
    group = hq // hkv
    rows = n * group
    block_rows = max(_MIN_BLOCK, min(block_sizes.block_rows, pl.next_power_of_2(rows)))
    padded_rows = pl.cdiv(rows, block_rows) * block_rows
    splits = block_sizes.kv_splits
    grid = (b, hkv, padded_rows // block_rows, splits)

    kernel = functools.partial(
        _tree_attention_kernel,
        group=group,
        block_k=block_sizes.block_k,
        tree_block=max(_MIN_BLOCK, min(block_sizes.block_k, pl.next_power_of_2(n))),
        kv_splits=splits,
        scale=d**-0.5,
        # f32 inputs would otherwise run through TF32 tensor cores (10-bit mantissa).
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
    )
    row_block = lambda bi, hi, ri, si: (si, bi, hi, ri)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((None,), lambda bi, hi, ri, si: (bi,)),
            pl.BlockSpec((None, n, n), lambda bi, hi, ri, si: (bi, 0, 0)),
            pl.BlockSpec((None, None, block_rows, d), lambda bi, hi, ri, si: (bi, hi, ri, 0)),
            pl.BlockSpec((None, None, s, d), lambda bi, hi, ri, si: (bi, hi, 0, 0)),
            pl.BlockSpec((None, None, s, d), lambda bi, hi, ri, si: (bi, hi, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_rows, d), lambda *i: (*row_block(*i), 0)),
            pl.BlockSpec((None, None, None, block_rows), row_block),
            pl.BlockSpec((None, None, None, block_rows), row_block),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, b, hkv, padded_rows, d), jnp.float32),
            jax.ShapeDtypeStruct((splits, b, hkv, padded_rows), jnp.float32),
            jax.ShapeDtypeStruct((splits, b, hkv, padded_rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(
            num_warps=block_sizes.num_warps or (4 if d <= 64 else 8), num_stages=block_sizes.num_stages
        ),
        interpret=interpret,
        name="tree_attention",
    )(lengths.astype(jnp.int32), tree_mask, _to_rows(q, hkv, padded_rows), k, v)
    return _from_rows(_combine(acc, m, l), n, hq).astype(q.dtype)
