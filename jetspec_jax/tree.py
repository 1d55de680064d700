"""Draft tree construction on device, with static shapes (DESIGN.md section 2, step 2).

The draft head gives per-depth logits `(D, V)`. Each depth keeps its top-W tokens; a node at
depth d is a choice of ranks `(r_1..r_d)` and its score is the sum of the chosen per-depth
log-probs. We keep the N-1 best nodes (N = budget, root included).

Worked example (W=2, D=2, N=5); per-depth top-2 log-probs:
    depth 1: "the" -0.2, "a" -1.8        depth 2: "cat" -0.3, "dog" -1.5
    node scores: the -0.2, the cat -0.5, the dog -1.7, a -1.8, a cat -2.1, a dog -3.3
    the best 4 give, nodes sorted by score (so parents come before children):
    node    0     1     2     3     4
    token   root  the   cat   dog   a
    parent  -1    0     1     1     0
    depth   0     1     2     2     1
    mask    row i marks node i and its ancestors ("ancestor-or-self"):
        1 0 0 0 0
        1 1 0 0 0
        1 1 1 0 0
        1 1 0 1 0
        1 0 0 0 1

Which nodes: the exact best N-1 ("best_first"), not the reference heap. The PyTorch reference
(`accum_logp`) pops the best frontier node and adds *all* its W children, so it spends budget on
low-scoring siblings. Here the N-1 highest-scoring nodes are chosen exactly. Because log-probs are
<= 0 a child never outscores its parent, so this set is always a valid tree (ancestor-closed). It
maximises the sum of path probabilities, which under the draft's independent-per-depth model is the
expected accepted length. It is also what best-first enumeration would return, but it is computed
without a sequential pop loop:

    beam search, one vectorised `top_k` per depth (D steps of a `scan`, not N pops): the depth-d
    nodes of the global best set are a prefix of all depth-d nodes in score order, and their parents
    are in the depth-(d-1) prefix. So keeping the best N-1 nodes per depth and extending only those
    is exact. A final `top_k` over the D beams, laid out depth-major, gives the best N-1 in order.

Ties are broken deterministically and never put a child before its parent: equal scores go to
the shallower node, then (same depth) to the node whose parent comes first, then to the lower
rank. Among tokens with equal log-probs at one depth, the lower token id gets the lower rank.
Log-probs are floored at -1e30 (probability 0 in float32) so that -inf can mark empty slots.

"top2gap" (adaptive fan-out, after the reference's `top2gap_fanout`): at depth d the gap
`g_d = logp(rank 1) - logp(rank 2)` gives a fan-out cap
`b_d = max(1, round(W * sigmoid(-beta * (g_d - center))))`: a decisive depth (large gap) does
not branch, an undecided one branches up to W. A node is *within caps* if each of its ranks r_e
satisfies r_e < b_e (0-based). The reference then returns a smaller tree when the capped tree has
fewer than N nodes; we need exactly N, so we order nodes by (within caps first, then score) and
keep the best N-1: the best N-1 capped nodes when there are that many, otherwise all capped nodes
plus the best of the rest. This order also never puts a child before its parent, so the same beam
search is exact.

"chain" is width 1: the path of each depth's argmax (DFlash-style linear block), first N-1 depths.

Forced path (prompt lookup, `lookup = L`): a chain of L given tokens p_1..p_L (see lookup.py)
takes nodes 1..L (root -> p_1 -> ... -> p_L); the head's nodes fill the other N-1-L slots. Each
row may take fewer: with `nodes` (B,), row b keeps only p_1..p_{nodes[b]} and the head fills the
rest; a row with 0 (its lookup found nothing) gets exactly the tree of `lookup = 0`, its nodes
not spent on a guess the head did not make (lookup.py says how many a row takes). A head
node whose path spells a prefix of the forced path is already in the tree, so it is not chosen
again (siblings stay distinct, which sampling needs), but its children are: their parent becomes
the forced node of the same depth. The head's nodes are then the best N-1-L of the others, an
exact choice by the same beam search (a forced node sits in every beam it could be in, since it
would be the best there; a node it pushes out of a beam could not be among the best N-1-L).
Example (L = 2, forced "x y", W = 2, N = 5), head top-2 per depth: depth 1 "x" -0.1, "a" -2.4;
depth 2 "y" -0.2, "b" -1.9. Head nodes by score: x (forced), x y (forced), x b -2.0, a -2.4, ...
    node    0     1     2     3     4
    token   root  x     y     b     a
    parent  -1    0     1     1     0

Column ids: draft logits over a reduced vocabulary have column v for target id `column_ids[v]`;
the tree's tokens are target ids either way.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KINDS = ("best_first", "chain", "top2gap")
_LOGP_FLOOR = -1e30  # below any real log-prob; D * floor stays finite in float32


@dataclasses.dataclass(frozen=True)
class TreeConfig:
    """Static tree shape. budget = N nodes including the root; width W; depth D = block size - 1."""

    budget: int
    width: int
    depth: int
    kind: str = "best_first"
    gap_beta: float = 1.0  # top2gap: sigmoid slope
    gap_center: float = 1.0  # top2gap: gap (nats) at which the cap is W/2
    lookup: int = 0  # L: nodes 1..L are a forced chain (prompt lookup, see lookup.py); 0: off

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"tree kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("budget", "width", "depth"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"tree {name} must be an integer >= 1, got {value!r}")
        if self.kind == "chain" and self.width != 1:
            raise ValueError(f"a chain has width 1, got width={self.width}")
        if self.kind == "top2gap":
            if self.width < 2:
                raise ValueError(f"top2gap needs width >= 2 (a rank-2 token), got {self.width}")
            if not (np.isfinite(self.gap_beta) and np.isfinite(self.gap_center)):
                raise ValueError("top2gap gap_beta and gap_center must be finite")
        if not 0 <= self.lookup < self.budget or self.lookup > self.depth:
            raise ValueError(f"tree lookup {self.lookup} must be below the budget {self.budget} "
                             f"and at most the depth {self.depth}")
        available = sum(self.width**d for d in range(1, self.depth + 1))
        if self.budget - 1 > available:
            raise ValueError(
                f"tree budget {self.budget} needs {self.budget - 1} non-root nodes but width "
                f"{self.width} and depth {self.depth} allow only {available}"
            )

    @classmethod
    def chain(cls, depth: int) -> "TreeConfig":
        """The full chain: one node per depth plus the root."""
        return cls(budget=depth + 1, width=1, depth=depth, kind="chain")


LOOKUP_ALL = "all"  # every node but the root goes to the lookup chain (rows with a match)


def parse_lookup(text) -> int | str:
    """A lookup option: a number of nodes >= 0, or 'all' (see `lookup_nodes`)."""
    text = str(text).strip()
    if text == LOOKUP_ALL:
        return LOOKUP_ALL
    if not text.isdigit():
        raise ValueError(f"lookup must be a non-negative integer or '{LOOKUP_ALL}', got {text!r}")
    return int(text)


def lookup_nodes(lookup: int | str, budget: int, depth: int) -> int:
    """The forced nodes of a lookup option in a tree of `budget` nodes and `depth` depths: 'all'
    is every node but the root, as deep as the head drafts (min(N - 1, D)); a number is itself."""
    return min(budget - 1, depth) if lookup == LOOKUP_ALL else int(lookup)


@flax.struct.dataclass
class Tree:
    """A draft tree per batch row. Node 0 is the root; parents come before children."""

    tokens: jax.Array  # (B, N) int32, node 0 = root token
    parents: jax.Array  # (B, N) int32, root -1
    depths: jax.Array  # (B, N) int32, root 0
    mask: jax.Array  # (B, N, N) bool, mask[b, i, j]: node j is node i or an ancestor of it


@functools.partial(jax.jit, static_argnames=("cfg",))
def build_tree(root: jax.Array, draft_logits: jax.Array, cfg: TreeConfig, forced=None,
               column_ids=None, nodes=None) -> Tree:
    """root (B,) int32, draft_logits (B, D, V) -> Tree with N = cfg.budget nodes per row.

    forced (B, L) int32 target ids, the forced chain when cfg.lookup = L > 0 (None: the head's
    own greedy chain stands in). nodes (B,) int32 in [0, L]: how many of its leading tokens each row
    takes (None: all L); the head's nodes fill the rest, so a row with 0 gets exactly the tree of
    lookup 0 (see lookup.py for how decoding chooses).
    column_ids (V,) int32: the target id of each logit column (None: the column index itself).
    """
    B, D, V = draft_logits.shape
    reach = min(cfg.depth, cfg.budget - 1)  # no node of N lies deeper than N - 1
    if not reach <= D <= cfg.depth:
        raise ValueError(f"draft_logits have {D} depths, tree config expects {reach} to {cfg.depth}")
    if cfg.width > V:
        raise ValueError(f"tree width {cfg.width} exceeds vocabulary size {V}")
    if nodes is not None and forced is None:
        raise ValueError("nodes needs the forced chains it counts")
    ids = (lambda t: t) if column_ids is None else (lambda t: jnp.take(column_ids, t).astype(jnp.int32))  # noqa: E731
    if cfg.lookup:
        if forced is None:  # no lookup proposal: the head's greedy chain
            forced = ids(jnp.argmax(draft_logits[:, : cfg.lookup], axis=-1).astype(jnp.int32))
        if forced.shape != (B, cfg.lookup):
            raise ValueError(f"forced chain has shape {forced.shape}, expected {(B, cfg.lookup)}")
        used = jnp.full((B,), cfg.lookup, jnp.int32) if nodes is None else jnp.clip(nodes, 0, cfg.lookup)
        row = functools.partial(_forced_row, cfg=cfg, ids=ids)
        tokens, parents = jax.vmap(row)(root, draft_logits, forced.astype(jnp.int32), used.astype(jnp.int32))
    elif cfg.budget == 1 or cfg.kind == "chain":
        tokens, parents = jax.vmap(functools.partial(_chain_row, cfg=cfg))(root, draft_logits)
        tokens = tokens.at[:, 1:].set(ids(tokens[:, 1:]))
    else:
        tokens, parents = jax.vmap(functools.partial(_tree_row, cfg=cfg))(root, draft_logits)
        tokens = tokens.at[:, 1:].set(ids(tokens[:, 1:]))
    depths, mask = jax.vmap(functools.partial(_depths_and_mask, max_depth=cfg.depth))(parents)
    return Tree(tokens=tokens, parents=parents, depths=depths, mask=mask)


def fanout_caps(top_logp: jax.Array, cfg: TreeConfig) -> jax.Array:
    """top2gap caps: top_logp (D, W) per-depth top-W log-probs -> (D,) int32 in [1, W]."""
    gap = top_logp[:, 0] - top_logp[:, 1]
    share = jax.nn.sigmoid(-cfg.gap_beta * (gap - cfg.gap_center))
    return jnp.maximum(1, jnp.round(cfg.width * share)).astype(jnp.int32)


def top_tokens(x: jax.Array, k: int, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """Same result as `lax.top_k(x, k)` (ties: lower index first), x (..., V) -> (..., k) twice.

    On CPU `lax.top_k` over a large vocabulary is slow (~1.5 ms for 15 x 32000), while a max over
    blocks is cheap. Each of the k largest entries lies in a block whose max is itself among the k
    largest, so the k blocks with the largest maxima (lower block first on ties) hold them all; we
    run `top_k` on those k * block entries only, kept in vocabulary order so ties still go to the
    lower index.
    """
    V = x.shape[-1]
    if V <= 8 * block:
        return lax.top_k(x, k)
    pad = -V % block  # padding is -inf at indices >= V, so it never beats a real entry
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
    blocks = x.reshape(*x.shape[:-1], -1, block)  # (..., V / block, block)
    _, best = lax.top_k(blocks.max(axis=-1), k)
    best = jnp.sort(best, axis=-1)  # (..., k) block ids in vocabulary order
    cand = jnp.take_along_axis(blocks, best[..., None], axis=-2)  # (..., k, block)
    values, pos = lax.top_k(cand.reshape(*cand.shape[:-2], k * block), k)
    ids = jnp.take_along_axis(best, pos // block, axis=-1) * block + pos % block
    return values, ids


def _chain_row(root, logits, cfg):
    """(), (D, V) -> tokens (N,), parents (N,): node d is depth d's argmax."""
    n = cfg.budget
    _, path = top_tokens(logits[: n - 1], 1)  # argmax, but fast on CPU for a large vocabulary
    path = path[:, 0].astype(jnp.int32)
    tokens = jnp.concatenate([root[None].astype(jnp.int32), path])
    return tokens, jnp.arange(-1, n - 1, dtype=jnp.int32)


def _tree_row(root, logits, cfg):
    """(), (D, V) -> tokens (N,), parents (N,) of the best N-1 nodes (see the module docstring)."""
    logits = logits[: min(cfg.depth, cfg.budget - 1)].astype(jnp.float32)  # deeper nodes never fit
    top_logit, top_tok = top_tokens(logits, cfg.width)  # (D, W) each
    top_logp = top_logit - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    top_logp = jnp.maximum(top_logp, _LOGP_FLOOR)
    capped = cfg.kind == "top2gap"
    over_cap = jnp.zeros(top_logp.shape, bool)  # (D, W): rank beyond the depth's fan-out cap
    if capped:
        over_cap = jnp.arange(cfg.width)[None, :] >= fanout_caps(top_logp, cfg)[:, None]

    n = cfg.budget
    beam = _beam_search(top_logp, over_cap, n - 1, capped)  # each field (D, K), K = N-1
    K = beam["score"].shape[1]
    chosen, _ = _best_k(beam["score"].reshape(-1), beam["over"].reshape(-1), n - 1, capped)
    depth = chosen // K + 1  # (N-1,): beam entry e holds a node at depth e // K + 1
    parent_entry = (depth - 2) * K + beam["parent"].reshape(-1)[chosen]  # < 0 at depth 1
    node_of_entry = jnp.zeros(beam["score"].size, jnp.int32).at[chosen].set(jnp.arange(1, n))
    parents = jnp.where(depth > 1, node_of_entry[jnp.maximum(parent_entry, 0)], 0)
    tokens = top_tok[depth - 1, beam["rank"].reshape(-1)[chosen]]
    tokens = jnp.concatenate([root[None].astype(jnp.int32), tokens.astype(jnp.int32)])
    return tokens, jnp.concatenate([jnp.array([-1], jnp.int32), parents.astype(jnp.int32)])


def _forced_row(root, logits, forced, used, cfg, ids):
    """(), (D, V), (L,), () -> tokens (N,) target ids, parents (N,): the first `used` forced tokens in
    nodes 1..used, then the best N-1-used head nodes that are not on that path (module docstring).

    `used` is a traced value, so the head's best N-1 off-path nodes are chosen (the most any row
    needs) and the first N-1-used of them fill the free slots: the best k of a set sorted by score
    are a prefix of its best N-1, and that prefix is ancestor-closed like the whole."""
    n, lookup = cfg.budget, cfg.lookup
    logits = logits[: min(cfg.depth, n - 1)].astype(jnp.float32)
    width = 1 if cfg.kind == "chain" else cfg.width
    top_logit, top_tok = top_tokens(logits, width)  # (D, W)
    top_logp = jnp.maximum(top_logit - jax.nn.logsumexp(logits, axis=-1, keepdims=True), _LOGP_FLOOR)
    capped = cfg.kind == "top2gap"
    over_cap = jnp.zeros(top_logp.shape, bool)
    if capped:
        over_cap = jnp.arange(width)[None, :] >= fanout_caps(top_logp, cfg)[:, None]
    top_ids = ids(top_tok)
    d = top_ids.shape[0]
    path = jnp.full((d,), -1, jnp.int32).at[:lookup].set(forced[: min(lookup, d)])
    path = jnp.where(jnp.arange(d) < used, path, -1)  # only the used prefix is in the tree
    on_path_tok = top_ids == path[:, None]  # (D, W): the rank spelling the forced token there
    k = n - 1
    beam = _beam_search(top_logp, over_cap, k, capped, on_path_tok)
    score = jnp.where(beam["forced"], -jnp.inf, beam["score"]).reshape(-1)
    over = (beam["over"] | beam["forced"]).reshape(-1)
    chosen, _ = _best_k(score, over, k, capped)  # the best head nodes off the path, best first
    depth = chosen // k + 1
    parent_entry = (depth - 2) * k + beam["parent"].reshape(-1)[chosen]
    # node index of each chosen entry (a repeated pick past the real entries keeps the first slot)
    slot = jnp.full(beam["score"].size, 2 * n, jnp.int32).at[chosen].min(used + 1 + jnp.arange(k, dtype=jnp.int32))
    parent_forced = beam["forced"].reshape(-1)[jnp.maximum(parent_entry, 0)]
    head_parents = jnp.where(depth > 1, jnp.where(parent_forced, depth - 1, slot[jnp.maximum(parent_entry, 0)]), 0)
    head_tokens = top_ids[depth - 1, beam["rank"].reshape(-1)[chosen]]
    node = jnp.arange(1, n)  # node i is forced token i-1 for i <= used, else head node i-1-used
    is_forced = node <= used
    from_head = jnp.maximum(node - 1 - used, 0)
    tokens = jnp.where(is_forced, forced[jnp.minimum(node - 1, lookup - 1)], head_tokens[from_head])
    parents = jnp.where(is_forced, node - 1, head_parents[from_head])
    tokens = jnp.concatenate([root[None].astype(jnp.int32), tokens.astype(jnp.int32)])
    return tokens, jnp.concatenate([jnp.array([-1], jnp.int32), parents.astype(jnp.int32)])


def _beam_search(top_logp, over_cap, k, capped, on_path_tok=None):
    """The k best nodes at each depth. top_logp (D, W), over_cap (D, W) -> dict of (D, k) arrays:
    score, over (some rank beyond its cap), parent (position in the previous depth's beam), rank,
    and with on_path_tok (D, W) bool, forced (the entry spells the forced path so far).

    Beams have a fixed size k so one `scan` step serves every depth; entries that do not exist yet
    (depth 1 has only W nodes) carry score -inf and over=True, so they sort after every real node.
    """
    width = top_logp.shape[1]
    score0 = jnp.full((k,), -jnp.inf).at[0].set(0.0)  # the root alone
    over0 = jnp.arange(k) > 0
    forced0 = jnp.arange(k) == 0  # the root is on the forced path
    if on_path_tok is None:
        on_path_tok = jnp.zeros(top_logp.shape, bool)

    def step(carry, depth_in):
        score, over, forced = carry  # (k,) each
        logp, cap, on_path = depth_in  # (W,) each
        # Candidates laid out parent-major, rank-minor, so index order = (parent order, rank).
        cand_score = (score[:, None] + logp[None, :]).reshape(-1)
        cand_over = (over[:, None] | cap[None, :]).reshape(-1)
        cand_forced = (forced[:, None] & on_path[None, :]).reshape(-1)
        idx, real = _best_k(cand_score, cand_over, k, capped)
        score = jnp.where(real, cand_score[idx], -jnp.inf)
        over = cand_over[idx] | ~real
        forced = cand_forced[idx] & real
        out = dict(score=score, over=over, parent=idx // width, rank=idx % width, forced=forced)
        return (score, over, forced), out

    _, beam = lax.scan(step, (score0, over0, forced0), (top_logp, over_cap, on_path_tok))
    return beam


def _best_k(score, over, k, capped):
    """The k best entries: score (M,) float, over (M,) bool -> indices (k,) int32, real (k,) bool.

    Order: higher score, then lower index; with `capped`, entries not over cap come first.
    Real scores are > -inf (log-probs are floored) and -inf marks a non-entry, which must be over
    cap. Picks past the real entries are not real (with `capped` they may repeat an index).
    """
    if not capped:
        _, idx = lax.top_k(score, k)
        return idx, score[idx] > -jnp.inf
    _, within = lax.top_k(jnp.where(over, -jnp.inf, score), k)
    _, beyond = lax.top_k(jnp.where(over, score, -jnp.inf), k)
    n_within = jnp.sum(~over)
    n_beyond = jnp.sum(over & (score > -jnp.inf))
    j = jnp.arange(k)
    idx = jnp.where(j < n_within, within, beyond[jnp.maximum(j - n_within, 0)])
    return idx, j < n_within + n_beyond


def _depths_and_mask(parents, max_depth):
    """parents (N,) -> depths (N,) int32, ancestor-or-self mask (N, N) bool."""
    n = parents.shape[0]
    steps = min(max_depth, n - 1)
    # ancestor[i, s] = the s-th ancestor of node i (s = 0: itself), -1 above the root.
    cols = [jnp.arange(n, dtype=jnp.int32)]
    for _ in range(steps):
        prev = cols[-1]
        cols.append(jnp.where(prev >= 0, parents[jnp.maximum(prev, 0)], -1))
    ancestor = jnp.stack(cols, axis=1)  # (N, steps+1)
    depths = jnp.sum(ancestor[:, 1:] >= 0, axis=1).astype(jnp.int32)
    # Node j is an ancestor-or-self of node i iff it is i's (depth_i - depth_j)-th ancestor.
    gap = depths[:, None] - depths[None, :]  # (N, N)
    at_gap = jnp.take_along_axis(ancestor, jnp.clip(gap, 0, steps), axis=1)
    mask = (gap >= 0) & (at_gap == jnp.arange(n)[None, :])
    return depths, mask
