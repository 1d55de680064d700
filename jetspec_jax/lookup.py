"""Prompt lookup: continuations copied from earlier in the text, proposed as a forced tree branch.

Answers often repeat what came before: a name from the prompt, a line of code being edited, a
step of a derivation, and (small models) whole loops of text. If the last n tokens (ending at the
root) occurred before, the tokens that followed that occurrence are a good guess for what comes
next. `build_tree` puts them in the tree as a forced chain next to the head's nodes (same budget);
verification decides, so the output never changes.

Static shapes: the match is a vectorised comparison over every position of the history buffer,
(B, S) per n-gram size, with no loop over the text.

Worked example, n = 2, L = 3, history "a b c d a b" (root = the last b, c = 5):
    suffix "a b" also ends at position 1 -> continuation from position 2: "c d a"
A match whose continuation runs into the root repeats the period (history "x y x y", c = 3: the
suffix "x y" ends at 1, period 2, continuation "x y x"), which is what a loop of text does next.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NGRAM_SIZES = (3, 2)  # longest first; a 1-token match is mostly noise


def _latest_match(history, c, n: int):
    """history (S,), c () root position -> (found (), end position j () of the latest earlier
    occurrence of history[c-n+1 .. c], ending before c)."""
    s = history.shape[0]
    pos = jnp.arange(s)
    suffix = jax.lax.dynamic_slice(history, (jnp.maximum(c - n + 1, 0),), (n,))
    match = (pos >= n - 1) & (pos < c) & (c >= n - 1)
    for t in range(n):  # history[j - (n-1) + t] == suffix[t]
        shifted = jnp.roll(history, n - 1 - t)  # shifted[j] = history[j - (n-1-t)] (wraps: masked by pos >= n-1)
        match = match & (shifted == suffix[t])
    j = jnp.max(jnp.where(match, pos, -1))
    return j >= 0, j


def lookup_row(history, c, length: int, sizes=NGRAM_SIZES):
    """history (S,) int32 (prompt + generated tokens, the root at c); c () int32
    -> (found () bool, continuation (length,) int32)."""
    found, j = jnp.bool_(False), jnp.int32(0)
    for n in sizes:  # the longest n with a match wins
        f, jn = _latest_match(history, c, n)
        j = jnp.where(found, j, jn)
        found = found | f
    period = jnp.maximum(c - j, 1)
    k = jnp.arange(length)
    cont = jnp.take(history, j + 1 + k % period, mode="clip")
    return found, cont.astype(jnp.int32)


def lookup_continuations(history, root_pos, length: int):
    """history (B, S), root_pos (B,) -> found (B,) bool, continuations (B, length) int32."""
    return jax.vmap(lambda h, c: lookup_row(h, c, length))(history, root_pos)
