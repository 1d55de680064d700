"""Tree attention in plain XLA: the CPU path (reads only the used slots), and the GPU fallback for
shapes the Pallas kernel does not cover (branch-free, see `tree_attention_xla_branch_free`).

The reference reads, masks and converts the whole (B, Hkv, S, D) cache in every layer, so a decoding
step costs O(capacity) however short the sequence is. Here the keys are cut to a static *window*
`[0, W)` with W the smallest of a few bucket sizes that covers `max(lengths) + N`; `lax.switch`
picks the window at run time, so the cost follows the longest row, not the capacity.

Worked example, S = 1024, N = 1: windows (128, 256, 512, 1024); lengths = [300] -> 301 slots are
used -> the 512-slot branch runs; slots [301, 512) are read but masked, slots >= 512 are not read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jetspec_jax.kernels.tree_attn.reference import visible_slots

MIN_WINDOW = 128  # smallest bucket; below this the per-branch overhead dominates


def window_sizes(num_queries: int, num_slots: int) -> tuple[int, ...]:
    """Static key windows: powers of two from MIN_WINDOW that can hold N rows and are at most S / 2
    (slicing a longer window copies more than reading the whole cache costs), then S itself."""
    sizes = []
    w = MIN_WINDOW
    while 2 * w <= num_slots:  # a window over half the cache costs more (a copy) than the whole
        if w >= num_queries:
            sizes.append(w)
        w *= 2
    return (*sizes, num_slots)


def _attend(q, k, v, lengths, tree_mask, window: int, guard: str = "cond"):
    """The reference's math on slots [0, window) only. k, v (B, Hkv, S, D) with S >= window.

    guard: how unused slots holding NaN/inf are kept out of the values' product: "cond" multiplies
    the raw V and recomputes with a masked V only if the result is not finite (cheapest on CPU);
    "mask" always multiplies a masked V (no conditional).
    """
    b, n, hq, d = q.shape
    hkv, g = k.shape[1], hq // k.shape[1]
    f32 = jnp.float32
    if window < k.shape[2]:  # a slice is a copy on XLA:CPU: worth it only for a short window
        k, v = k[:, :, :window], v[:, :, :window]
    # Batched over (B, Hkv), the G query heads of a group stacked with the N queries, so that each
    # product reads the (W, D) cache window as it lies in memory. K is the left operand: XLA:CPU
    # runs (W, D) x (D, G*N) several times faster than (G*N, D) x (D, W).
    qg = q.reshape(b, n, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * n, d)
    batch = ((0, 1), (0, 1))
    scores = jax.lax.dot_general(k, qg, (((3,), (3,)), batch), preferred_element_type=f32)  # (B, Hkv, W, G*N)
    scores = jnp.swapaxes(scores, 2, 3) * (d**-0.5)
    # Keys need no mask: the score of an invisible slot is replaced by -inf whatever it is (NaN
    # included), so its probability is exactly 0.
    visible = visible_slots(lengths, tree_mask, window)  # (B, N, W)
    scores = jnp.where(visible[:, None, None], scores.reshape(b, hkv, g, n, window), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, hkv, g * n, window)

    def weighted(values):
        return jax.lax.dot_general(probs, values.astype(f32), (((3,), (2,)), batch), preferred_element_type=f32)

    # A zero probability times a finite value adds exactly 0, so unused slots holding finite values
    # (always, in this package's caches) need no mask; a NaN or inf there would poison the sum, so
    # a non-finite result is recomputed with unused values zeroed. This skips a masked copy of V
    # per layer and step, and the result equals the masked product bit for bit.
    def masked():
        used = jnp.arange(window, dtype=jnp.int32)[None, :] < (lengths + n)[:, None]  # (B, W)
        return weighted(jnp.where(used[:, None, :, None], v, jnp.zeros((), v.dtype)))

    if guard == "mask":
        out = masked()
    else:
        out = weighted(v)  # (B, Hkv, G*N, D)
        out = jax.lax.cond(jnp.all(jnp.isfinite(out)), lambda: out, masked)
    out = out.reshape(b, hkv, g, n, d).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, n, hq, d).astype(q.dtype)


def tree_attention_xla(q, k, v, lengths, tree_mask):
    """q (B, N, Hq, D); k, v (B, Hkv, S, D); lengths (B,); tree_mask (B, N, N) -> (B, N, Hq, D).

    Same contract and result as `tree_attention_reference` (float32 accumulation; slots at
    >= lengths + N never influence the result), at a cost that grows with max(lengths) + N.
    """
    n, s = q.shape[1], k.shape[2]
    windows = window_sizes(n, s)
    if len(windows) == 1:
        return _attend(q, k, v, lengths, tree_mask, s)
    need = jnp.max(lengths) + n
    branch = jnp.sum(jnp.asarray(windows[:-1], jnp.int32) < need)  # first window >= need
    branches = [functools.partial(_attend, window=w) for w in windows]
    return jax.lax.switch(branch, branches, q, k, v, lengths, tree_mask)


def tree_attention_xla_branch_free(q, k, v, lengths, tree_mask):
    """`tree_attention_xla` without conditionals, for GPUs: every layer reads the whole cache and
    masks V, because on a GPU each `cond`/`switch` in the decoding loop waits on the device for its
    predicate (a host round trip per layer and round), which costs more than the unused slots."""
    return _attend(q, k, v, lengths, tree_mask, k.shape[2], guard="mask")
