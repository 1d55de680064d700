"""Prompt lookup: the n-gram match equals a host search, the forced branch joins the tree exactly
(brute force), and decoding with it stays lossless, greedy and sampled."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetspec_jax.decode import generate
from jetspec_jax.lookup import (MAX_MATCH, MIN_MATCH, NONE, SHORT, TABLE, TABLE_LOW, TEXT, branch_continuations,
                                branch_nodes, lookup_continuations)
from jetspec_jax.step import DecodeConfig
from jetspec_jax.tree import TreeConfig, build_tree

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
from branch_split import SOURCES  # noqa: E402
from lookup_rules import longest_suffix  # noqa: E402
from test_tree import assert_structure, host_per_depth, near_tie  # noqa: E402


def host_lookup(history, c, length):
    """The host search of scripts/lookup_rules.py (the earlier occurrence sharing the longest
    suffix, up to MAX_MATCH tokens, at least MIN_MATCH, the latest of equally long ones; its
    continuation, repeating the period where it runs into the root) -> (found, continuation)."""
    cont = longest_suffix(list(history), c, length)
    return cont is not None, cont


def test_lookup_matches_host_search():
    rng = np.random.default_rng(0)
    rows, s = 200, 40
    history = rng.integers(0, 4, size=(rows, s)).astype(np.int32)  # 4 symbols: many matches
    history[::7] = np.arange(s) % 5  # loops of period 5
    c = rng.integers(0, s, size=rows).astype(np.int32)
    match, cont = jax.device_get(lookup_continuations(jnp.asarray(history), jnp.asarray(c), 4))
    for r in range(rows):
        want_found, want = host_lookup(history[r], int(c[r]), 4)
        assert bool(match[r]) == want_found, r
        assert match[r] == host_shared_suffix(history[r], int(c[r])), r
        if want_found:
            assert cont[r].tolist() == want, r


def host_shared_suffix(text, c):
    """Brute force: the most tokens (capped at MAX_MATCH) that the text ending at some j < c shares
    with the text ending at the root c; 0 below MIN_MATCH."""
    best = 0
    for j in range(c):
        k = 0
        while k < MAX_MATCH and j - k >= 0 and text[j - k] == text[c - k]:
            k += 1
        best = max(best, k)
    return best if best >= MIN_MATCH else 0


def test_the_longest_shared_suffix_wins_over_the_latest():
    # "0 1 2 3" ends at 3 (4 tokens shared with the text before the root), "1 2 3" at 8 (3 shared)
    history = jnp.array([[0, 1, 2, 3, 8, 9, 1, 2, 3, 7, 0, 1, 2, 3, 0, 0]], jnp.int32)
    match, cont = jax.device_get(lookup_continuations(history, jnp.array([13]), 4))
    assert match[0] == 4 and cont[0].tolist() == [8, 9, 1, 2]
    # a 1-token match is not enough; nothing before the first token
    found, _ = jax.device_get(lookup_continuations(jnp.array([[4, 5, 6, 4, 0]], jnp.int32), jnp.array([3]), 2))
    assert not bool(found[0])
    found, _ = jax.device_get(lookup_continuations(jnp.array([[4, 4, 4]], jnp.int32), jnp.array([0]), 2))
    assert not bool(found[0])


def host_forced_tree(logits, forced, cfg):
    """Token paths of the best N-1-L head nodes that do not spell a prefix of the forced chain."""
    order, top_lp, _ = host_per_depth(logits, cfg)
    lookup = len(forced)
    keys = []
    for d in range(1, cfg.depth + 1):
        for ranks in itertools.product(range(cfg.width), repeat=d):
            path = tuple(int(order[e, r]) for e, r in enumerate(ranks))
            if d <= lookup and list(path) == list(forced[:d]):
                continue  # already in the tree as a forced node
            keys.append((-sum(top_lp[e, r] for e, r in enumerate(ranks)), d, ranks, path))
    return sorted(keys)[: cfg.budget - 1 - lookup]


def device_paths(tokens, parents):
    paths = [()]
    for i in range(1, len(tokens)):
        paths.append(paths[parents[i]] + (int(tokens[i]),))
    return paths


@pytest.mark.parametrize("n,w,d,lookup", [(8, 4, 4, 3), (16, 4, 5, 4), (6, 3, 5, 5), (9, 2, 6, 2)])
def test_forced_branch_joins_the_best_head_nodes(n, w, d, lookup):
    rng = np.random.default_rng(n * 100 + lookup)
    rows, vocab = 24, 12
    logits = (rng.normal(size=(rows, d, vocab)) * 2).astype(np.float32)
    cfg = TreeConfig(budget=n, width=w, depth=d, lookup=lookup)
    forced = rng.integers(0, vocab, size=(rows, lookup)).astype(np.int32)
    for r in range(0, rows, 3):  # some rows copy the head's own greedy path (a full overlap)
        forced[r] = np.argmax(logits[r, :lookup], axis=-1)
    roots = np.arange(rows) % vocab
    tree = jax.device_get(build_tree(jnp.asarray(roots, jnp.int32), jnp.asarray(logits), cfg, jnp.asarray(forced)))
    assert_structure(tree, roots, max(w, 1) + 1)  # a forced node may add one sibling to W head ones
    for r in range(rows):
        tokens, parents = tree.tokens[r], tree.parents[r]
        np.testing.assert_array_equal(tokens[1 : lookup + 1], forced[r])
        np.testing.assert_array_equal(parents[1 : lookup + 1], np.arange(lookup))
        paths = device_paths(tokens, parents)
        assert len(set(paths)) == n  # no path twice: siblings are distinct
        expected = host_forced_tree(logits[r], forced[r], cfg)
        got = paths[lookup + 1 :]
        if sorted(got) != sorted(k[3] for k in expected):  # allowed only for near-tied scores
            _, top_lp, _ = host_per_depth(logits[r], cfg)
            order = host_per_depth(logits[r], cfg)[0]
            score = {k[3]: -k[0] for k in expected}
            worst = min(score.values())
            for p in set(got) - set(score):
                s = sum(top_lp[e, list(order[e]).index(t)] for e, t in enumerate(p))
                assert abs(s - worst) <= near_tie(worst, d), (r, p)


@pytest.mark.parametrize("kind,w", [("best_first", 3), ("chain", 1), ("top2gap", 3)])
def test_rows_take_their_own_number_of_branch_nodes(kind, w):
    """A row that takes k of the L forced tokens gets exactly the tree built with lookup = k from
    those k (k = 0: the lookup-0 tree), each built separately here, row by row."""
    rng = np.random.default_rng(11)
    rows, d, vocab, n, lookup = 8, 5, 16, 6, 4
    logits = jnp.asarray(rng.normal(size=(rows, d, vocab)).astype(np.float32))
    forced = np.asarray(rng.integers(0, vocab, size=(rows, lookup)).astype(np.int32))
    forced[5] = np.argmax(np.asarray(logits[5, :lookup]), axis=-1)  # the head's own greedy path
    nodes = jnp.array([4, 0, 2, 1, 0, 3, 4, 2], jnp.int32)
    roots = jnp.arange(rows, dtype=jnp.int32)
    cfg = TreeConfig(budget=n, width=w, depth=d, kind=kind, lookup=lookup)
    got = jax.device_get(build_tree(roots, logits, cfg, jnp.asarray(forced), None, nodes))
    for k in range(lookup + 1):
        static = TreeConfig(budget=n, width=w, depth=d, kind=kind, lookup=k)
        want = jax.device_get(build_tree(roots, logits, static, jnp.asarray(forced[:, :k]) if k else None))
        for r in np.flatnonzero(np.asarray(nodes) == k):
            for field in ("tokens", "parents", "depths", "mask"):
                np.testing.assert_array_equal(getattr(got, field)[r], getattr(want, field)[r], err_msg=f"{r} {k}")
    assert not np.array_equal(got.tokens[1, 1 : lookup + 1], forced[1])  # not spent where nothing matched
    with pytest.raises(ValueError, match="nodes needs"):
        build_tree(roots, logits, cfg, None, None, nodes)


def test_branch_source_and_nodes():
    """Long text matches keep the whole branch, short ones and table chains leave the head a share
    (lookup.py); rows with neither take none."""
    history = jnp.array([[5, 6, 7, 8, 9, 1, 5, 6, 7, 8, 9, 0, 0],  # "5 6 7 8 9" again: 5 shared -> TEXT
                         [5, 6, 1, 2, 3, 5, 6, 0, 0, 0, 0, 0, 0],  # "5 6" again: 2 shared -> SHORT
                         [1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)  # no match -> NONE
    pos = jnp.array([10, 6, 3])
    source, forced = jax.device_get(branch_continuations(history, pos, 3))
    assert source.tolist() == [TEXT, SHORT, NONE]
    assert forced[0].tolist() == [1, 5, 6] and forced[1].tolist() == [1, 2, 3]
    for lookup, want in [(3, [0, 3, 3, 3, 1]), (7, [0, 5, 6, 7, 3]), (15, [0, 11, 12, 15, 5])]:
        got = branch_nodes(jnp.array([NONE, TABLE, SHORT, TEXT, TABLE_LOW]), lookup)
        assert np.asarray(got).tolist() == want, lookup


def test_branch_split_names_the_sources_in_lookup_order():
    """scripts/branch_split.py spells the source names by hand (no jax at import); they must index as lookup's."""
    import jetspec_jax.lookup as lookup

    assert [getattr(lookup, name.upper()) for name in SOURCES] == list(range(len(SOURCES)))


def test_chain_with_lookup_is_a_valid_tree():
    logits = np.random.default_rng(3).normal(size=(5, 7, 20)).astype(np.float32)
    cfg = TreeConfig(budget=8, width=1, depth=7, kind="chain", lookup=3)
    forced = np.argmax(logits[:, :3], -1).astype(np.int32)
    forced[1] = [4, 4, 4]
    tree = jax.device_get(build_tree(jnp.zeros(5, jnp.int32), jnp.asarray(logits), cfg, jnp.asarray(forced)))
    assert_structure(tree, [0] * 5, 2)
    # row 0: the head's chain is the forced one: the head continues it from depth 4
    np.testing.assert_array_equal(tree.parents[0], [-1, 0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(tree.tokens[0, 4:], np.argmax(logits[0, 3:7], -1))


def test_lookup_config_is_checked():
    with pytest.raises(ValueError, match="lookup"):
        TreeConfig(budget=4, width=2, depth=3, lookup=4)
    with pytest.raises(ValueError, match="lookup"):
        TreeConfig(budget=8, width=2, depth=2, lookup=3)


@pytest.fixture(scope="module")
def setup():
    from test_speculative import HEAD, TARGET
    from jetspec_jax.head import init_head_params
    from jetspec_jax.model import init_params

    params = {"target": init_params(TARGET, jax.random.PRNGKey(0)), "head": init_head_params(HEAD, jax.random.PRNGKey(1))}
    return TARGET, HEAD, params


@pytest.mark.parametrize("tree", [TreeConfig(budget=6, width=3, depth=5, lookup=3),
                                  TreeConfig(budget=8, width=1, depth=7, kind="chain", lookup=4),
                                  TreeConfig(budget=4, width=4, depth=3, lookup=3)])
def test_lookup_is_lossless_and_copies_loops(setup, tree):
    target, head, params = setup
    prompts = [[5, 9, 2, 5, 9, 2, 5, 9], [7, 1, 3, 3, 8, 12, 40], [11]]
    ar = generate({"target": params["target"]}, prompts, DecodeConfig(target=target), max_new_tokens=40)
    out = generate(params, prompts, DecodeConfig(target=target, head=head, tree=tree), max_new_tokens=40)
    assert [g.ids for g in out] == [g.ids for g in ar]
    # A random tiny target falls into loops; lookup copies them, the random head cannot.
    plain = generate(params, prompts, DecodeConfig(target=target, head=head, tree=TreeConfig(
        budget=tree.budget, width=tree.width, depth=tree.depth, kind=tree.kind)), max_new_tokens=40)
    rounds = lambda gens: sum(len(g.accept_lengths) for g in gens)  # noqa: E731
    assert rounds(out) < rounds(plain)
