"""Draft tree construction against host versions written independently in numpy/Python.

`host_brute_force` enumerates every node (rank tuple) up to depth D, scores it in float64 and sorts;
it is the specification. `host_best_first` (a heap that pops the best node and pushes all its
children) is a second host version for depths too large to enumerate; it is checked against brute
force. Both order nodes by (beyond a top2gap cap?, -score, depth, rank tuple).

The device scores in float32, so two nodes whose scores differ by a few float32 roundings may come
out in either order. `assert_matches_host` therefore reads each device node back as a rank tuple and
requires the same nodes in the same order, except that such near-tied neighbours may swap; without
near-ties (most cases) this is exact equality. Exact ties are checked separately (all-equal logits).
"""

import heapq
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit

from jetspec_jax.tree import Tree, TreeConfig, build_tree, top_tokens

VOCAB = 40


# ---------------------------------------------------------------- host versions (numpy / Python)


def host_per_depth(logits, cfg):
    """logits (D, V) -> top-W tokens (D, W), their float64 log-probs (D, W), caps (D,) list."""
    x = np.asarray(logits, np.float64)
    m = x.max(axis=-1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    order = np.argsort(-logp, axis=-1, kind="stable")[:, : cfg.width]  # ties: lower id first
    top_lp = np.take_along_axis(logp, order, axis=-1)
    caps = [cfg.width] * cfg.depth
    if cfg.kind == "top2gap":
        share = expit(-cfg.gap_beta * ((top_lp[:, 0] - top_lp[:, 1]) - cfg.gap_center))  # sigmoid
        assert np.all(np.abs((cfg.width * share) % 1.0 - 0.5) > 1e-4), "cap near a .5 boundary"
        caps = [max(1, int(np.round(cfg.width * s))) for s in share]
    return order, top_lp, caps


def node_key(ranks, top_lp, caps):
    over = any(r >= caps[d] for d, r in enumerate(ranks))
    score = sum(top_lp[d, r] for d, r in enumerate(ranks))
    return (over, -score, len(ranks), ranks)


def host_brute_force(logits, cfg):
    """Keys of the best N-1 nodes in order: every rank tuple up to depth D, sorted."""
    _, top_lp, caps = host_per_depth(logits, cfg)
    ranks = range(cfg.width)
    nodes = [r for d in range(1, cfg.depth + 1) for r in itertools.product(ranks, repeat=d)]
    return sorted(node_key(r, top_lp, caps) for r in nodes)[: cfg.budget - 1]


def host_best_first(logits, cfg):
    """Keys of the best N-1 nodes in order: pop the best node, push all its children (a child
    never beats its parent under node_key, so pops come out in sorted order)."""
    _, top_lp, caps = host_per_depth(logits, cfg)
    heap = [node_key((r,), top_lp, caps) for r in range(cfg.width)]
    heapq.heapify(heap)
    popped = []
    while len(popped) < cfg.budget - 1:
        key = heapq.heappop(heap)
        popped.append(key)
        if len(key[3]) < cfg.depth:
            for r in range(cfg.width):
                heapq.heappush(heap, node_key(key[3] + (r,), top_lp, caps))
    return popped


def host_tree(root, keys, logits, cfg):
    """Node keys in order -> tokens, parents, depths as lists (root first)."""
    order, _, _ = host_per_depth(logits, cfg)
    index = {(): 0}
    tokens, parents, depths = [int(root)], [-1], [0]
    for i, (_, _, depth, ranks) in enumerate(keys, start=1):
        index[ranks] = i
        tokens.append(int(order[depth - 1, ranks[-1]]))
        parents.append(index[ranks[:-1]])  # KeyError if a parent comes after its child
        depths.append(depth)
    return tokens, parents, depths


def near_tie(score, depth):
    """Scores closer than this may compare differently in float32 (device) and float64 (host):
    a few float32 roundings per depth, each relative to the magnitude."""
    return 4 * np.finfo(np.float32).eps * (depth + 2) * (1 + abs(score))


def assert_matches_host(tokens, parents, root, logits, cfg, expected):
    """Device tree row == host node keys `expected`, up to swaps of near-tied nodes."""
    order, top_lp, caps = host_per_depth(logits, cfg)
    assert tokens[0] == root and parents[0] == -1
    ranks = [()]
    for i in range(1, cfg.budget):
        assert 0 <= parents[i] < i, f"node {i} has parent {parents[i]}"
        parent = ranks[parents[i]]
        ranks.append(parent + (list(order[len(parent)]).index(tokens[i]),))
    got = [node_key(r, top_lp, caps) for r in ranks[1:]]
    assert len(set(ranks)) == cfg.budget, "a node appears twice"
    if [k[3] for k in got] == [k[3] for k in expected]:
        return
    # Not identical: allowed only where both orders agree up to near-ties.
    for g, e in zip(got, expected):
        assert g[0] == e[0], f"node {g[3]} vs {e[3]}: cap flags differ"
        assert abs(g[1] - e[1]) <= near_tie(e[1], cfg.depth), f"node {g[3]} vs expected {e[3]}"


def assert_structure(tree, roots, width):
    """Invariants every tree row must satisfy, whatever the logits."""
    n = tree.tokens.shape[1]
    for b, root in enumerate(roots):
        tokens, parents, depths = tree.tokens[b], tree.parents[b], tree.depths[b]
        assert tokens[0] == root and parents[0] == -1 and depths[0] == 0
        assert np.all(parents[1:] >= 0) and np.all(parents[1:] < np.arange(1, n))  # parents first
        np.testing.assert_array_equal(depths[1:], depths[parents[1:]] + 1)
        np.testing.assert_array_equal(tree.mask[b], host_ancestor_mask(parents))
        for p in range(n):
            siblings = tokens[1:][parents[1:] == p].tolist()
            assert len(set(siblings)) == len(siblings) <= width


def host_ancestor_mask(parents):
    n = len(parents)
    mask = np.zeros((n, n), bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


def random_logits(seed, batch, depth, scale=2.0):
    return np.random.default_rng(seed).normal(size=(batch, depth, VOCAB)).astype(np.float32) * scale


def build(roots, logits, cfg) -> Tree:
    return jax.device_get(build_tree(jnp.asarray(roots, jnp.int32), jnp.asarray(logits), cfg))


# ---------------------------------------------------------------- tests


CASES = [  # (budget N, width W, depth D, kind)
    (2, 4, 3, "best_first"),
    (7, 4, 3, "best_first"),
    (33, 8, 3, "best_first"),
    (64, 4, 5, "best_first"),
    (33, 2, 7, "best_first"),
    (7, 4, 3, "top2gap"),
    (33, 8, 3, "top2gap"),
    (64, 4, 5, "top2gap"),
]


@pytest.mark.parametrize("n,w,d,kind", CASES)
def test_matches_brute_force(n, w, d, kind):
    cfg = TreeConfig(budget=n, width=w, depth=d, kind=kind)
    roots, logits = [5, 11, 17], random_logits(seed=n * 100 + w * 10 + d, batch=3, depth=d)
    tree = build(roots, logits, cfg)
    chex.assert_shape([tree.tokens, tree.parents, tree.depths], (3, n))
    chex.assert_shape(tree.mask, (3, n, n))
    assert_structure(tree, roots, w)
    for b in range(3):
        expected = host_brute_force(logits[b], cfg)
        assert_matches_host(tree.tokens[b], tree.parents[b], roots[b], logits[b], cfg, expected)


@pytest.mark.parametrize("kind", ["best_first", "top2gap"])
def test_extreme_logits_match_brute_force(kind):
    # Log-probs down to about -1e5: real nodes must still beat the beam's empty slots.
    cfg = TreeConfig(budget=33, width=8, depth=3, kind=kind)
    roots, logits = [1, 2, 3], random_logits(seed=8, batch=3, depth=3, scale=1e4)
    tree = build(roots, logits, cfg)
    assert_structure(tree, roots, 8)
    for b in range(3):
        expected = host_brute_force(logits[b], cfg)
        assert_matches_host(tree.tokens[b], tree.parents[b], roots[b], logits[b], cfg, expected)


def test_host_best_first_equals_brute_force():
    for n, w, d, kind in [(33, 8, 3, "best_first"), (64, 4, 5, "top2gap"), (20, 2, 8, "top2gap")]:
        cfg = TreeConfig(budget=n, width=w, depth=d, kind=kind)
        logits = random_logits(seed=7, batch=1, depth=d)[0]
        assert host_best_first(logits, cfg) == host_brute_force(logits, cfg)


@pytest.mark.parametrize("n,kind", [(64, "best_first"), (256, "best_first"), (64, "top2gap")])
def test_full_depth_matches_host_best_first(n, kind):
    cfg = TreeConfig(budget=n, width=8, depth=15, kind=kind)
    # Peaked logits (scale 6) make deep paths likely, so the tree really uses many depths.
    roots, logits = [1, 2], random_logits(seed=n, batch=2, depth=15, scale=6.0)
    tree = build(roots, logits, cfg)
    assert_structure(tree, roots, 8)
    for b in range(2):
        expected = host_best_first(logits[b], cfg)
        assert_matches_host(tree.tokens[b], tree.parents[b], roots[b], logits[b], cfg, expected)
    assert tree.depths.max() >= 5  # the test exercises deep trees, not just a wide first level


def test_budget_one_is_the_root_alone():
    tree = build([4, 2], random_logits(seed=1, batch=2, depth=3), TreeConfig(1, 4, 3))
    chex.assert_trees_all_equal(tree, Tree(tokens=np.array([[4], [2]], np.int32),
                                           parents=np.full((2, 1), -1, np.int32),
                                           depths=np.zeros((2, 1), np.int32),
                                           mask=np.ones((2, 1, 1), bool)))


def test_chain_is_per_depth_argmax():
    cfg = TreeConfig.chain(depth=6)
    roots, logits = [9, 8], random_logits(seed=2, batch=2, depth=6)
    tree = build(roots, logits, cfg)
    np.testing.assert_array_equal(tree.tokens[:, 1:], logits.argmax(-1))
    np.testing.assert_array_equal(tree.tokens[:, 0], roots)
    np.testing.assert_array_equal(tree.parents, np.tile(np.arange(-1, 6), (2, 1)))
    np.testing.assert_array_equal(tree.mask, np.tile(np.tril(np.ones((7, 7), bool)), (2, 1, 1)))
    best_first = build(roots, logits, TreeConfig(budget=7, width=1, depth=6))
    chex.assert_trees_all_equal(tree, best_first)


def test_all_ties_give_breadth_first_order():
    # Uniform logits: every node at depth d scores -d*log(V). Ties go to the shallower node, then
    # the earlier parent, then the lower rank, and top-W takes the lowest token ids on ties:
    # breadth-first order of the complete W-ary tree, node tokens = their rank.
    cfg = TreeConfig(budget=15, width=3, depth=3)
    tree = build([7], np.zeros((1, 3, VOCAB), np.float32), cfg)
    zeros = np.zeros((3, VOCAB))
    expected = host_tree(7, host_brute_force(zeros, cfg), zeros, cfg)
    np.testing.assert_array_equal(tree.tokens[0], expected[0])
    np.testing.assert_array_equal(tree.parents[0], expected[1])
    bfs = [()] + [r for d in (1, 2, 3) for r in itertools.product(range(3), repeat=d)][:14]
    np.testing.assert_array_equal(tree.tokens[0, 1:], [r[-1] for r in bfs[1:]])


def test_top2gap_fills_beyond_caps_when_capped_tree_is_small():
    # One token per depth is 20 nats above the rest: gap > 10, so the cap is
    # max(1, round(4 * sigmoid(-9))) = 1 and the capped tree is the chain of those tokens
    # (D nodes); the other N-1-D nodes are the best nodes beyond the caps.
    cfg = TreeConfig(budget=7, width=4, depth=3, kind="top2gap")
    roots, logits = [0, 1, 2], random_logits(seed=3, batch=3, depth=3, scale=1.0)
    favourite = np.random.default_rng(3).integers(0, VOCAB, size=(3, 3))
    np.put_along_axis(logits, favourite[..., None], 20.0, axis=-1)
    tree = build(roots, logits, cfg)
    np.testing.assert_array_equal(tree.tokens[:, 1:4], favourite)
    np.testing.assert_array_equal(tree.parents[:, 1:4], np.tile([0, 1, 2], (3, 1)))
    for b in range(3):
        expected = host_brute_force(logits[b], cfg)
        assert_matches_host(tree.tokens[b], tree.parents[b], roots[b], logits[b], cfg, expected)


def test_top2gap_with_caps_at_width_is_best_first():
    # A huge gap_center makes every cap W, which is the uncapped best-N-1 tree.
    roots, logits = [1, 2, 3], random_logits(seed=4, batch=3, depth=5)
    capped = build(roots, logits, TreeConfig(64, 4, 5, kind="top2gap", gap_center=1e9))
    plain = build(roots, logits, TreeConfig(64, 4, 5))
    chex.assert_trees_all_equal(capped, plain)


def test_batch_rows_are_independent():
    cfg = TreeConfig(budget=64, width=4, depth=5, kind="top2gap")
    roots, logits = np.array([1, 2, 3]), random_logits(seed=5, batch=3, depth=5)
    tree = build(roots, logits, cfg)
    changed = logits.copy()
    changed[1] = random_logits(seed=6, batch=1, depth=5)[0]
    other = build(roots, changed, cfg)
    assert not np.array_equal(other.tokens[1], tree.tokens[1])  # the change does matter ...
    for field in ("tokens", "parents", "depths", "mask"):  # ... but only to its own row
        np.testing.assert_array_equal(getattr(other, field)[[0, 2]], getattr(tree, field)[[0, 2]])
    perm = [2, 0, 1]
    permuted = build(roots[perm], logits[perm], cfg)
    chex.assert_trees_all_equal(permuted, jax.tree.map(lambda x: x[perm], tree))


def test_no_retrace_for_new_logits_or_roots():
    cfg = TreeConfig(budget=16, width=4, depth=5)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(roots, logits):
        return build_tree(roots, logits, cfg)

    for seed in range(3):
        logits = jnp.asarray(random_logits(seed, batch=2, depth=5))
        jax.block_until_ready(run(jnp.array([seed, seed + 1], jnp.int32), logits))


def test_top_tokens_equals_lax_top_k():
    rng = np.random.default_rng(0)
    # V not a multiple of the block, many exact ties (small integers), some -inf entries.
    x = rng.integers(0, 6, size=(4, 3000)).astype(np.float32)
    x[0, :2000] = -np.inf
    x[1] = 0.0
    x[2] = rng.normal(size=3000)
    # Equal values in blocks with different maxima: lax.top_k gives [640, 130, 641].
    x[3] = -1.0
    x[3, [640, 641, 130]] = [9.0, 7.0, 7.0]
    both = jax.jit(lambda x: [(top_tokens(x, k), jax.lax.top_k(x, k)) for k in (1, 3, 8)])
    for (values, ids), (ref_values, ref_ids) in both(jnp.asarray(x)):
        np.testing.assert_array_equal(values, ref_values)
        np.testing.assert_array_equal(ids, ref_ids)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(budget=8, width=2, depth=2), "allow only 6"),
        (dict(budget=0, width=2, depth=2), "budget must be an integer >= 1"),
        (dict(budget=3, width=0, depth=2), "width must be an integer >= 1"),
        (dict(budget=3, width=2, depth=2, kind="heap"), "tree kind must be one of"),
        (dict(budget=3, width=2, depth=2, kind="chain"), "a chain has width 1"),
        (dict(budget=2, width=1, depth=2, kind="top2gap"), "top2gap needs width >= 2"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TreeConfig(**kwargs)


def test_shape_mismatch_is_rejected():
    # budget 4 reaches depth 3 at most: 3 or 4 depths of logits are accepted, 2 or 5 are not.
    for depths in (2, 5):
        with pytest.raises(ValueError, match=f"draft_logits have {depths} depths"):
            build_tree(jnp.zeros(1, jnp.int32), jnp.zeros((1, depths, 10)), TreeConfig(4, 2, 4))


@pytest.mark.parametrize("kind", ["best_first", "top2gap", "chain"])
def test_logits_past_the_budget_reach_change_nothing(kind):
    """A tree of N nodes lies within depth N - 1, so the decoder drafts only those depths: the
    tree from the first N - 1 depths must equal the tree from all of them."""
    width = 1 if kind == "chain" else 3
    cfg = TreeConfig(5, width, 9, kind=kind)
    logits = jax.random.normal(jax.random.key(3), (2, 9, 40)) * 3
    root = jnp.array([7, 11], jnp.int32)
    full, cut = build_tree(root, logits, cfg), build_tree(root, logits[:, :4], cfg)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(cut)):
        np.testing.assert_array_equal(a, b)
