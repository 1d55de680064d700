"""Acceptance equals a brute-force host walk down the tree (DESIGN.md section 2, step 4)."""

import numpy as np
import pytest

from jetspec_jax.accept import accept


def random_tree(rng, n, vocab, max_depth):
    """Parents before children, distinct sibling tokens, depth <= max_depth."""
    parents, depths, tokens = [-1], [0], [int(rng.integers(vocab))]
    children = {0: set()}
    while len(parents) < n:
        p = int(rng.integers(len(parents)))
        if depths[p] == max_depth:
            continue
        free = sorted(set(range(vocab)) - children[p])
        if not free:
            continue
        tok = int(rng.choice(free))
        children[p].add(tok)
        children[len(parents)] = set()
        parents.append(p)
        depths.append(depths[p] + 1)
        tokens.append(tok)
    mask = np.zeros((n, n), bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return np.array(tokens), np.array(parents), np.array(depths), mask


def walk(tokens, parents, y):
    """From the root, follow the child whose token is the target's token at the current node."""
    node, path = 0, [0]
    while True:
        nxt = [i for i in range(len(tokens)) if parents[i] == node and tokens[i] == y[node]]
        assert len(nxt) <= 1
        if not nxt:
            return path, [int(tokens[i]) for i in path[1:]] + [int(y[node])]
        node = nxt[0]
        path.append(node)


@pytest.mark.parametrize("n,max_depth,vocab", [(1, 0, 5), (7, 3, 3), (33, 6, 4), (64, 15, 3)])
def test_accept_matches_host_walk(n, max_depth, vocab):
    rng = np.random.default_rng(n)
    batch = []
    for _ in range(6):
        tokens, parents, depths, mask = random_tree(rng, n, vocab, max_depth)
        # Bias the target toward the drafted tokens so that long paths get accepted too.
        y = np.array([tokens[rng.choice(np.flatnonzero(parents == i))] if (parents == i).any()
                      and rng.random() < 0.8 else rng.integers(vocab) for i in range(n)])
        batch.append((tokens, parents, depths, mask, y))
    stack = [np.stack([row[k] for row in batch]) for k in range(5)]
    acc = accept(*stack, max_depth=max_depth)
    longest = 0
    for b, (tokens, parents, depths, mask, y) in enumerate(batch):
        path, emitted = walk(tokens, parents, y)
        a = len(path) - 1
        longest = max(longest, a)
        assert int(acc.num_accepted[b]) == a
        assert int(acc.best[b]) == path[-1]
        assert np.asarray(acc.path[b, : a + 1]).tolist() == path
        assert np.asarray(acc.emitted[b, : a + 1]).tolist() == emitted
    if max_depth >= 3:
        assert longest >= 2  # the biased target makes deep acceptance happen; the test is not vacuous
