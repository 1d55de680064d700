"""Answer n-grams: what the target wrote next after the same words in its own training answers.

Prompt lookup (lookup.py) copies a continuation from earlier in the text; where the text has no
earlier occurrence of its ending, the target's own answers to the training prompts often do: a
small model says "To solve this problem, we need to" or `def f(x):\\n    return` the same way
every time. This table proposes, for the last n tokens of the text, the token that most often
followed them in those answers (longest known n first), and repeats that step to draft a chain.
`step.tree_from_logits` uses it for the lookup branch of rows whose text has no match, so it
spends no node the text lookup would have used. Verification decides, so outputs never change.

Table (shipped next to a head as `ngrams.safetensors`, built by `scripts/build_ngrams.py`):

    keys    (M,) int32, sorted: a 32-bit hash of (n, the n tokens), for every order n in `orders`
    next    (M,) int32: the token that most often followed those n tokens (ties: the lower id)
    orders  (O,) int32: the context lengths, e.g. (4, 5, 6, 8, 10, 12, 16)

An n-gram whose most frequent successor is already what the shorter orders predict is left out
(it would change no draft: the same drafts from an eighth of the entries), and so are n-grams seen
fewer than `min_count` times. The shipped SmolLM2 table keeps those seen once (min_count 1): they
are mostly verbatim repeats of earlier answers, and on the validation split they add 0.04 to tau at
N=8 (docs/training.md section 13). Hash collisions can only make a draft wrong, never an output.
Orders below LONG (4) are a back-off band for contexts no longer order knows: they never prune a
longer order's entry, so a context is known at LONG tokens or more whether or not the table has the
band, and the order of the first step's entry (`ngram_row`) tells the two kinds of chain apart
(lookup.TABLE and TABLE_LOW take different shares of the branch).

Worked example, orders (2, 3), three answers after prompts ending in "P": "a b c", "a b c", "x b d":
    order 2: (P a) -> b, (a b) -> c (2 of 2), (P x) -> b, (x b) -> d; (b c) and (b d) end an answer
    order 3: (P a b) -> c and (P x b) -> d, but order 2 already predicts both: left out
    text "... y a b", length 3: the longest known suffix is (a b) -> "c"; "a b c" then ends in (b c),
    which is unknown, so the chain is "c 0 0" (the 0s are rejected by verification like any wrong guess).

Static shapes: each draft step hashes the last n tokens for every order (O x n multiply-adds) and
finds them with one binary search per order (`jnp.searchsorted`, log2(M) steps), no loop over the
text.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

HASH_MUL = 1000003  # odd multiplier of the polynomial hash (mod 2**32)
LONG = 4  # orders below this are a back-off band: they never prune a longer order's entries
FILE = "ngrams.safetensors"


def hash_ngrams(windows: np.ndarray, order: int) -> np.ndarray:
    """Host hash: windows (..., order) non-negative token ids -> (...,) int32 keys (uint32 bits)."""
    h = np.full(windows.shape[:-1], order, np.uint32)
    for t in range(order):
        h = h * np.uint32(HASH_MUL) + (windows[..., t].astype(np.uint32) + np.uint32(1))
    return h.view(np.int32)


def _hash_device(window, order: int):
    """Device hash, bit-identical to `hash_ngrams`: window (order,) int32 -> () int32."""
    h = jnp.uint32(order)
    for t in range(order):
        h = h * jnp.uint32(HASH_MUL) + (window[t].astype(jnp.uint32) + jnp.uint32(1))
    return jax.lax.bitcast_convert_type(h, jnp.int32)


def build_table(sequences, orders, min_count: int = 1):
    """Host: the table of `sequences`, a list of (tokens (n,) int, first answer position p) pairs:
    n-grams that end at positions q >= p - 1 (their successor, q + 1, is an answer token) may reach
    back into the prompt; n-grams seen fewer than `min_count` times are left out.
    -> dict(keys, next, orders) numpy arrays (keys sorted)."""
    orders = sorted({int(n) for n in orders})
    if not orders or orders[0] < 1:
        raise ValueError(f"orders must be positive, got {orders}")
    kept_keys, kept_next = [], []  # per order, ascending, each sorted by key
    corpus, first = [], []
    for tokens, p in sequences:
        tokens = np.asarray(tokens, np.int64)
        corpus.append(tokens)
        first.append(max(int(p), 1))
    for n in orders:
        hs, nx, windows = [], [], []
        for tokens, p in zip(corpus, first):
            ends = np.arange(max(p - 1, n - 1), len(tokens) - 1)  # q: the n-gram ends at q
            if not len(ends):
                continue
            win = tokens[ends[:, None] - np.arange(n - 1, -1, -1)[None, :]]
            hs.append(hash_ngrams(win, n))
            nx.append(tokens[ends + 1])
            windows.append(win)
        if not hs:  # no n-gram this long (nor any longer one)
            kept_keys.append(np.zeros(0, np.int32))
            kept_next.append(np.zeros(0, np.int64))
            continue
        h, nxt, win = np.concatenate(hs), np.concatenate(nx), np.concatenate(windows)
        # most frequent successor per key (ties: lower id); count of the key
        pairs, idx, counts = np.unique(np.stack([h.astype(np.int64), nxt], 1), axis=0,
                                       return_index=True, return_counts=True)
        order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))
        pairs, idx, counts = pairs[order], idx[order], counts[order]
        head = np.r_[True, pairs[1:, 0] != pairs[:-1, 0]]
        totals = np.add.reduceat(counts, np.flatnonzero(head))
        keys, best, rep = pairs[head, 0].astype(np.int32), pairs[head, 1], idx[head]
        keep = totals >= min_count
        band = [i for i, m in enumerate(orders[: len(kept_keys)]) if (m >= LONG) == (n >= LONG)]
        if band:  # left out where the shorter orders of its band already predict the same token
            keep &= best != _predict_host([kept_keys[i] for i in band], [kept_next[i] for i in band],
                                          [orders[i] for i in band], win[rep])
        kept_keys.append(keys[keep])  # sorted: `pairs` is sorted by key
        kept_next.append(best[keep])
    keys = np.concatenate(kept_keys) if kept_keys else np.zeros(0, np.int32)
    nxt = np.concatenate(kept_next) if kept_next else np.zeros(0, np.int64)
    order = np.argsort(keys, kind="stable")
    return {"keys": keys[order].astype(np.int32), "next": nxt[order].astype(np.int32),
            "orders": np.array(orders, np.int32)}


def _predict_host(key_parts, next_parts, orders, windows):
    """What the partial table (parts per order, each sorted by key) predicts for each window (M,
    n >= max order): the successor of the longest order found, -1 where none."""
    out = np.full(len(windows), -1, np.int64)
    for n, keys, nxt in zip(orders, key_parts, next_parts):  # ascending: longer orders override
        if not len(keys):
            continue
        h = hash_ngrams(windows[:, -n:], n)
        pos = np.minimum(np.searchsorted(keys, h), len(keys) - 1)
        out = np.where(keys[pos] == h, nxt[pos], out)
    return out


def check_table(table: dict, vocab_size: int, where: str = FILE) -> None:
    """Raise ValueError (one line) unless `table` is a usable n-gram table for `vocab_size` ids."""
    for name in ("keys", "next", "orders"):
        if name not in table:
            raise ValueError(f"{where}: missing {name!r}")
    keys, nxt, orders = (np.asarray(table[k]) for k in ("keys", "next", "orders"))
    if keys.ndim != 1 or nxt.shape != keys.shape or not len(keys) or orders.ndim != 1 or not len(orders):
        raise ValueError(f"{where}: keys and next must be (M,) with M >= 1 and orders (O,) with O >= 1")
    if keys.dtype != np.int32 or not np.issubdtype(nxt.dtype, np.integer) or not np.issubdtype(orders.dtype, np.integer):
        raise ValueError(f"{where}: keys must be int32 and next, orders integers")
    if np.any(keys[1:] < keys[:-1]):
        raise ValueError(f"{where}: keys are not sorted")
    if nxt.min() < 0 or nxt.max() >= vocab_size:
        raise ValueError(f"{where}: next ids must lie in [0, {vocab_size})")
    if orders.min() < 1 or orders.max() > 64 or len(set(orders.tolist())) != len(orders):
        raise ValueError(f"{where}: orders must be distinct and in [1, 64]")


def ngram_row(keys, nxt, history, c, length: int, orders: tuple):
    """keys, nxt (M,); history (S,) int32 with the root at c -> (order () int32: the longest context
    the first step knew, 0 where it knew none; chain (length,) int32; unknown later steps are 0)."""
    top = max(orders)
    last = keys.shape[0] - 1
    pos = c - top + 1 + jnp.arange(top)
    buf = jnp.concatenate([jnp.take(history, jnp.maximum(pos, 0)), jnp.zeros((length,), jnp.int32)])
    known = jnp.concatenate([pos >= 0, jnp.ones((length,), bool)])  # context inside the text
    first = jnp.zeros((), jnp.int32)
    alive = jnp.zeros((), bool)
    for i in range(length):
        end = top + i  # the context is buf[end - n: end]
        tok, hit = jnp.zeros((), jnp.int32), jnp.zeros((), bool)
        for n in sorted(orders):  # ascending: a longer known context overrides
            h = _hash_device(jax.lax.dynamic_slice(buf, (end - n,), (n,)), n)
            at = jnp.minimum(jnp.searchsorted(keys, h), last)
            ok = known[end - n] & (keys[at] == h)
            tok = jnp.where(ok, nxt[at], tok)
            hit = hit | ok
            if i == 0:
                first = jnp.where(ok, n, first)
        if i == 0:
            alive = hit
        alive = alive & hit  # after an unknown step the chain is 0s
        buf = buf.at[end].set(jnp.where(alive, tok, 0))
    return first, buf[top:]


@functools.partial(jax.jit, static_argnames=("length", "orders"))
def ngram_continuations(keys, nxt, history, root_pos, length: int, orders: tuple):
    """history (B, S), root_pos (B,) -> order (B,) int32 (the first step's longest known context, 0:
    none), chains (B, length) int32."""
    return jax.vmap(lambda h, c: ngram_row(keys, nxt, h, c, length, orders))(history, root_pos)


def without_ngrams(cfg, params: dict):
    """(head config, head params) without the answer n-gram table (a no-op for heads without one)."""
    if not cfg.ngram_orders:
        return cfg, params
    params = {k: v for k, v in params.items() if k not in ("ngram_keys", "ngram_next")}
    return cfg.replace(ngram_orders=()), params
