"""The processed target distribution and sampling from it (DESIGN.md section 2, step 4).

Processing, in the order of Hugging Face's logits warpers (temperature, top-k, top-p):
  1. logits / temperature;
  2. top-k (k > 0): keep every token whose logit is >= the k-th largest (ties at the threshold are
     kept, as in HF's `TopKLogitsWarper`);
  3. top-p (p < 1), on the top-k renormalised distribution: in descending order, keep each token
     whose preceding mass is < p (so always the first), and every token tied with the last one kept
     (so the kept set never depends on how a sort orders equal logits);
  4. renormalise.
Example, p = 0.75 and probabilities (0.5, 0.3, 0.15, 0.05): preceding masses (0, 0.5, 0.8, 0.95),
so the first two tokens are kept and renormalised to (0.625, 0.375).

Temperature 0 means greedy: the distribution is a point mass on the argmax (lowest id on ties).
Temperature, top-k and top-p are per-row arrays `(B,)`, so changing them never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jetspec_jax.errors import UserError

_BLOCK = 128  # vocabulary block for two-level inverse-CDF sampling


def validate_sampling(temperature, top_k, top_p) -> None:
    """The one check of sampling values (scalars or per-row arrays), on the host: the CLI calls it
    before loading anything, `decode.make_sampling` before building the arrays. Raises UserError
    (one line, in the CLI's option names)."""
    temperature, top_k, top_p = (np.asarray(v) for v in (temperature, top_k, top_p))
    if not np.all(np.isfinite(temperature) & (temperature >= 0)):
        raise UserError(f"--temperature must be a finite number >= 0, got {_shown(temperature)}")
    if not np.all(top_k == np.round(top_k)) or not np.all(top_k >= 0):
        raise UserError(f"--top-k must be a whole number >= 0 (0 turns it off), got {_shown(top_k)}")
    if not np.all((top_p > 0) & (top_p <= 1)):
        raise UserError(f"--top-p must be in (0, 1] (1 turns it off), got {_shown(top_p)}")


def _shown(values: np.ndarray) -> str:
    return str(values.tolist())


def processed_logprobs(logits, temperature, top_k, top_p) -> jax.Array:
    """logits (B, N, V), temperature (B,), top_k (B,) int (0 = off), top_p (B,) (1 = off)
    -> (B, N, V) float32 log-probs, -inf for excluded tokens."""
    logp = jax.nn.log_softmax(_truncated_logits(logits, temperature, top_k, top_p), axis=-1)
    greedy = _argmax(logits)[..., None] == lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    point_mass = jnp.where(greedy, 0.0, -jnp.inf)
    return jnp.where(temperature[:, None, None] == 0, point_mass, logp)


def sample_tokens(key, logits, temperature, top_k, top_p) -> jax.Array:
    """One independent draw per node from the processed distribution -> (B, N) int32.

    key (B,) typed keys or (B, 2) uint32; logits (B, N, V); temperature, top_k, top_p (B,).
    Rows with temperature 0 take the argmax. Batch rows through these (B,) arrays rather than
    `vmap` over them: under `vmap` the `cond` that skips the vocabulary sort becomes a select.
    """
    N = logits.shape[1]
    x = _truncated_logits(logits, temperature, top_k, top_p)
    u = jax.vmap(lambda k: jax.random.uniform(k, (N, 2)))(key)  # (B, N, 2)
    sampled = _inverse_cdf(x, u)
    return jnp.where(temperature[:, None] == 0, _argmax(logits), sampled)


def _truncated_logits(logits, temperature, top_k, top_p):
    """(B, N, V) -> logits / temperature with excluded tokens at -inf (not normalised).

    The cut-off (the smallest logit kept) depends on the platform the program is lowered for:
    on CPU, a sort of the vocabulary under a `cond` that skips it unless a sampling row
    (temperature > 0) uses top-k or top-p; on GPU, sort-free bisections with no branch (a `cond`
    in the decoding loop waits on the device for its predicate, and sorting a 151936-token
    vocabulary per tree node costs more than a few dozen reductions). Both keep exactly the same
    tokens. The branches return only the (B, N, 1) cut-off, so the (B, N, V) arithmetic after it
    fuses with its consumers.
    """
    safe_t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    x = logits.astype(jnp.float32) / safe_t[:, None, None]
    cutoff = lax.platform_dependent(x, temperature, top_k, top_p, cuda=_bisected_cutoff, rocm=_bisected_cutoff,
                                    default=_sorted_cutoff_when_needed)
    return jnp.where(x >= cutoff, x, -jnp.inf)


def _sorted_cutoff_when_needed(x, temperature, top_k, top_p):
    truncating = jnp.any((temperature > 0) & ((top_k > 0) | (top_p < 1)))
    no_cutoff = lambda x, k, p: jnp.full((*x.shape[:2], 1), -jnp.inf, x.dtype)
    return lax.cond(truncating, _top_k_top_p_cutoff, no_cutoff, x, top_k, top_p)


def _top_k_top_p_cutoff(x, top_k, top_p):
    """x (B, N, V), top_k (B,), top_p (B,) -> (B, N, 1): the smallest logit kept by top-k, top-p."""
    V = x.shape[-1]
    desc = -jnp.sort(-x, axis=-1)  # (B, N, V) logits in descending order
    k = jnp.where((top_k > 0) & (top_k < V), top_k, V).astype(jnp.int32)
    kth = jnp.take_along_axis(desc, jnp.broadcast_to(k[:, None, None] - 1, (*x.shape[:2], 1)), -1)
    weights = jnp.where(desc >= kth, jnp.exp(desc - desc[..., :1]), 0.0)  # top-k, unnormalised
    n_keep = _n_kept_top_p(weights, top_p[:, None, None])
    top_p_cut = jnp.take_along_axis(desc, n_keep - 1, axis=-1)  # logit of the last token kept
    return jnp.where(top_p[:, None, None] < 1, jnp.maximum(kth, top_p_cut), kth)


def _ordered_bits(x):
    """float32 -> uint32 in the same order (-inf lowest, +inf highest; -0.0 just below +0.0)."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    sign = jnp.uint32(0x80000000)
    return jnp.where(bits & sign, ~bits, bits | sign)


def _smallest_key_where(keys, holds):
    """The smallest uint32 t with holds(t) true, per (B, N) row, by bisection over the 2^32 keys:
    holds is monotone (false, then true) and true at the row's largest key; false below its
    smallest. 32 halvings, each one O(V) reduction -> (B, N, 1) uint32."""
    lo = jnp.min(keys, axis=-1, keepdims=True) - 1  # holds(lo) is false (keys >= 1: see _ordered_bits)
    hi = jnp.max(keys, axis=-1, keepdims=True)  # holds(hi) is true

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = holds(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    _, hi = lax.fori_loop(0, 32, halve, (lo, hi), unroll=True)
    return hi


def _bisected_cutoff(x, temperature, top_k, top_p):
    """The cut-off of `_top_k_top_p_cutoff` without sorting: x (B, N, V) -> (B, N, 1).

    top-k keeps x iff fewer than k logits are strictly above it; top-p (on the top-k distribution)
    keeps x iff the mass strictly above it is < p x the total, which is the sorted rule ("preceding
    mass < p", ties with the last kept token kept). Each rule is monotone in x, so its threshold is
    the smallest key (`_ordered_bits`) that satisfies it, found by bisection.
    """
    del temperature  # rows that do not sample ignore the cut-off
    V = x.shape[-1]
    keys = _ordered_bits(x)
    k = jnp.where((top_k > 0) & (top_k < V), top_k, V).astype(jnp.int32)[:, None, None]
    k_cut = _smallest_key_where(keys, lambda t: jnp.sum(keys > t, axis=-1, keepdims=True, dtype=jnp.int32) < k)
    in_top_k = keys >= k_cut
    weights = jnp.where(in_top_k, jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)), 0.0)
    target = top_p[:, None, None] * weights.sum(axis=-1, keepdims=True)
    p_cut = _smallest_key_where(keys, lambda t: jnp.sum(jnp.where(keys > t, weights, 0.0), axis=-1, keepdims=True) < target)
    cut = jnp.where(top_p[:, None, None] < 1, jnp.maximum(k_cut, p_cut), k_cut)
    # The smallest logit at or above the key (as a float, so that -0.0 and +0.0 tie as in the sort).
    return jnp.min(jnp.where(keys >= cut, x, jnp.inf), axis=-1, keepdims=True)


def _n_kept_top_p(weights, p):
    """How many sorted tokens top-p keeps: weights (B, N, V) in descending order, p (B, 1, 1)
    -> (B, N, 1) int32 = 1 + #{i : weights[0..i] sums to < p * total} (never 0, at most V).

    Running sums in two levels (blocks of the vocabulary, then inside the one block where the
    running mass reaches p) avoid (B, N, V) temporaries: this runs inside a `cond`, and XLA:CPU
    pays for a branch's large temporaries even when it is not taken (N=64, V=49152: ~13 ms more
    per call with one extra (B, N, V) temporary in the branch).
    """
    V = weights.shape[-1]
    block = min(_BLOCK, V)
    w = jnp.pad(weights, ((0, 0), (0, 0), (0, -V % block))).reshape(*weights.shape[:2], -1, block)
    mass = w.sum(axis=-1)  # (B, N, V / block)
    start = jnp.cumsum(mass, axis=-1) - mass  # running mass before each block
    target = p * mass.sum(axis=-1, keepdims=True)  # (B, N, 1)
    which = jnp.sum(start < target, axis=-1, keepdims=True) - 1  # block where the mass reaches p
    inside = jnp.take_along_axis(w, which[..., None], axis=2)[:, :, 0]  # (B, N, block)
    running = jnp.take_along_axis(start, which, axis=-1) + jnp.cumsum(inside, axis=-1)
    n_below = which * block + jnp.sum(running < target, axis=-1, keepdims=True)
    return jnp.minimum(n_below + 1, V).astype(jnp.int32)


def _argmax(x):
    """(..., V) -> (...) int32 index of the max, lowest on ties. Same as jnp.argmax, but a max and
    a min reduction run ~4x faster on CPU than XLA's arg-reduce."""
    iota = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    is_max = x == jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(is_max, iota, x.shape[-1]), axis=-1)


def _inverse_cdf(x, u):
    """Sample from softmax(x): x (B, N, V) with -inf for excluded tokens, u (B, N, 2) uniforms in
    [0, 1) -> (B, N) int32.

    Two levels, each exact: pick a vocabulary block with probability proportional to its mass, then
    a token inside it. This needs one exp over V and cumulative sums over blocks only, where Gumbel
    max (`jax.random.categorical`) draws V random numbers per node (5-7x slower on CPU for N=16-64,
    V=49152).
    """
    B, N, V = x.shape
    block = min(_BLOCK, V)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, -V % block)), constant_values=-jnp.inf)
    weights = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)).reshape(B, N, -1, block)
    which = _pick(weights.sum(axis=-1), u[..., 0])  # (B, N) block index
    inside = jnp.take_along_axis(weights, which[..., None, None], axis=2)[:, :, 0]  # (B, N, block)
    return which * block + _pick(inside, u[..., 1])


def _pick(weights, u):
    """Index i with probability weights[i] / sum(weights): weights (..., M) >= 0, u (...) -> (...).

    The first i whose running sum exceeds u * total always has weight > 0; if rounding leaves none
    (u * total rounded up to the total), take the last positive weight, so a token with weight 0
    (excluded) is never returned.
    """
    cum = jnp.cumsum(weights, axis=-1)
    chosen = jnp.sum(cum <= u[..., None] * cum[..., -1:], axis=-1)
    iota = lax.broadcasted_iota(jnp.int32, weights.shape, weights.ndim - 1)
    last_positive = jnp.max(jnp.where(weights > 0, iota, 0), axis=-1)
    return jnp.minimum(chosen, last_positive).astype(jnp.int32)
