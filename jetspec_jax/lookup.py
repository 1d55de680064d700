"""Prompt lookup: continuations copied from earlier in the text, proposed as a forced tree branch.

Answers often repeat what came before: a name from the prompt, a line of code being edited, a
step of a derivation, and (small models) whole loops of text. If the text ending at the root
occurred before, the tokens that followed that occurrence are a good guess for what comes next.
The occurrence used is the one sharing the longest suffix with the text (up to MAX_MATCH tokens,
at least MIN_MATCH; the latest of equally long ones): on the held-out answers of the SmolLM2 head
this accepts more than taking the latest match of the last 3 (else 2) tokens (tau 3.80 against
3.62 with all 7 non-root nodes of N=8 given to the branch; docs/training.md section 12).
`build_tree` puts the continuation in the tree as a forced chain next to the head's nodes (same
budget); a row with no match takes the chain of the head's answer n-gram table where the head
ships one (ngrams.py; `branch_continuations`), else keeps the head's own tree of all N nodes.
Verification decides, so the output never changes.

Static shapes: the match is a vectorised comparison over every position of the history buffer,
(B, S) per suffix offset, MAX_MATCH of them, with no loop over the text.

Worked example, L = 3, history "a b c d a b" (root = the last b, c = 5):
    the suffix "a b" also ends at position 1 (2 tokens shared; "d a b" vs "_ a b" no longer)
    -> continuation from position 2: "c d a"
A match whose continuation runs into the root repeats the period (history "x y x y", c = 3: the
suffix "x y" ends at 1, period 2, continuation "x y x"), which is what a loop of text does next.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jetspec_jax.ngrams import ngram_continuations

MAX_MATCH = 16  # suffix tokens compared; longer shared suffixes count as this long
MIN_MATCH = 2  # a 1-token match is mostly noise


def _longest_match(history, c):
    """history (S,), c () root position -> (found (), end position j () of the earlier occurrence
    (j < c) sharing the longest suffix with history[.. c], the latest among equally long ones)."""
    s = history.shape[0]
    pos = jnp.arange(s)
    run = pos < c  # still matching at every offset so far
    length = jnp.zeros((s,), jnp.int32)
    for k in range(MAX_MATCH):  # offset k: history[j - k] == history[c - k]
        shifted = jnp.roll(history, k)  # shifted[j] = history[j - k] (wraps: masked by j >= k)
        same = shifted == history[jnp.maximum(c - k, 0)]
        run = run & (pos >= k) & (c >= k) & same
        length = length + run.astype(jnp.int32)
    best = jnp.max(length)
    j = jnp.max(jnp.where(length == best, pos, -1))  # the latest of the longest
    return best >= MIN_MATCH, j


def lookup_row(history, c, length: int):
    """history (S,) int32 (prompt + generated tokens, the root at c); c () int32
    -> (found () bool, continuation (length,) int32)."""
    found, j = _longest_match(history, c)
    period = jnp.maximum(c - j, 1)
    k = jnp.arange(length)
    cont = jnp.take(history, j + 1 + k % period, mode="clip")
    return found, cont.astype(jnp.int32)


def lookup_continuations(history, root_pos, length: int):
    """history (B, S), root_pos (B,) -> found (B,) bool, continuations (B, length) int32."""
    return jax.vmap(lambda h, c: lookup_row(h, c, length))(history, root_pos)


def branch_continuations(history, root_pos, length: int, head_params=None, orders: tuple = ()):
    """The lookup branch of every row: the text's own continuation where it has a match, else, with
    a head that ships an answer n-gram table (`orders` non-empty, `head_params["ngram_keys"]` and
    `["ngram_next"]`), the table's chain (ngrams.py) -> found (B,) bool, continuations (B, length)."""
    found, forced = lookup_continuations(history, root_pos, length)
    if orders:
        known, chain = ngram_continuations(head_params["ngram_keys"], head_params["ngram_next"], history,
                                           root_pos, length, orders)
        forced, found = jnp.where(found[:, None], forced, chain), found | known
    return found, forced
