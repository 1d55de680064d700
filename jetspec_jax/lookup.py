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

How many of the L branch nodes a row takes depends on where its branch comes from (`branch_nodes`):
all L for a text match of at least SHORT_MATCH tokens (a loop or a copied span: it runs on), L less
floor(L / 5) for a shorter match, L less floor(3 L / 10) for the table's chain; the head drafts the
rest of the tree. Chosen on the validation split (docs/val/branch-split.md, scripts/branch_split.py):
tau at N = 8 4.089 against 4.049 with every branch node, at N = 16 6.056 against 5.946 (N = 4
unchanged); on the evaluation sets' answers (first 128 tokens) the gain is larger (MATH-500 N = 16
3.34 against 2.98).
A chain that is sure only at first (a table chain, a 2-token match) ends before the head's own
guesses stop paying. A table chain whose first step knew only 1 to 3 tokens of context (the table's
back-off band, ngrams.LONG) is surer still only at first: it keeps L less floor(7 L / 10) nodes (N = 4:
1, N = 8: 3, N = 16: 5), the per-source best on the whole validation split with the order-1 table
(docs/val/branch-split-order1.md; 4.360 against 4.358 with 2 nodes at N = 8).

Static shapes: the match is a vectorised comparison over every position of the history buffer,
(B, S) per suffix offset, MAX_MATCH of them, with no loop over the text.

Worked example, L = 3, history "a b c d a b" (root = the last b, c = 5):
    the suffix "a b" also ends at position 1 (2 tokens shared; "d a b" vs "_ a b" no longer)
    -> continuation from position 2: "c d a"
A match whose continuation runs into the root repeats the period (history "x y x y", c = 3: the
suffix "x y" ends at 1, period 2, continuation "x y x"), which is what a loop of text does next.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jetspec_jax.ngrams import LONG, ngram_continuations

MAX_MATCH = 16  # suffix tokens compared; longer shared suffixes count as this long
MIN_MATCH = 2  # a 1-token match is mostly noise
SHORT_MATCH = 4  # a text match shorter than this gives floor(L * SHORT_SHARE) of its L nodes to the head
SHORT_SHARE = 0.2
TABLE_SHARE = 0.3  # the table's chain gives floor(L * TABLE_SHARE) of its L nodes to the head
TABLE_LOW_SHARE = 0.7  # a chain whose first step knew under ngrams.LONG tokens gives this share to the head

# Where a row's branch comes from (`branch_continuations`), in the order `branch_nodes` reads.
NONE, TABLE, SHORT, TEXT, TABLE_LOW = range(5)


def _longest_match(history, c):
    """history (S,), c () root position -> (shared suffix length () of the earlier occurrence that
    shares the longest suffix with history[.. c] (at most MAX_MATCH), its end position j () (j < c;
    the latest among equally long ones))."""
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
    return best, j


def lookup_row(history, c, length: int):
    """history (S,) int32 (prompt + generated tokens, the root at c); c () int32
    -> (match () int32: tokens shared with the text before, 0 where below MIN_MATCH (no match),
    continuation (length,) int32)."""
    best, j = _longest_match(history, c)
    period = jnp.maximum(c - j, 1)
    k = jnp.arange(length)
    cont = jnp.take(history, j + 1 + k % period, mode="clip")
    return jnp.where(best >= MIN_MATCH, best, 0).astype(jnp.int32), cont.astype(jnp.int32)


def lookup_continuations(history, root_pos, length: int):
    """history (B, S), root_pos (B,) -> match (B,) int32 (0: none), continuations (B, length) int32."""
    return jax.vmap(lambda h, c: lookup_row(h, c, length))(history, root_pos)


def branch_continuations(history, root_pos, length: int, head_params=None, orders: tuple = ()):
    """The lookup branch of every row: the text's own continuation where it has a match, else, with
    a head that ships an answer n-gram table (`orders` non-empty, `head_params["ngram_keys"]` and
    `["ngram_next"]`), the table's chain (ngrams.py) -> source (B,) int32 (NONE; TABLE, TABLE_LOW: a
    chain whose first step knew a context of at least / below ngrams.LONG tokens; SHORT: a text match
    below SHORT_MATCH tokens; TEXT), continuations (B, length) int32."""
    match, forced = lookup_continuations(history, root_pos, length)
    source = jnp.where(match >= SHORT_MATCH, TEXT, jnp.where(match > 0, SHORT, NONE))
    if orders:
        order, chain = ngram_continuations(head_params["ngram_keys"], head_params["ngram_next"], history,
                                           root_pos, length, orders)
        forced = jnp.where(match[:, None] > 0, forced, chain)
        table = jnp.where(order >= LONG, TABLE, TABLE_LOW)
        source = jnp.where((match == 0) & (order > 0), table, source)
    return source.astype(jnp.int32), forced


def branch_nodes(source, lookup: int):
    """source (B,) from `branch_continuations` -> (B,) int32: how many of the L = `lookup` branch
    nodes each row puts in its tree (0 for NONE: the head's own tree)."""
    table = [0, lookup - math.floor(lookup * TABLE_SHARE), lookup - math.floor(lookup * SHORT_SHARE), lookup,
             lookup - math.floor(lookup * TABLE_LOW_SHARE)]
    return jnp.asarray(table, jnp.int32)[source]
