"""Speculative decoding is lossless: every mode emits exactly the target's own greedy tokens."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetspec_jax.config import ModelConfig
from jetspec_jax.decode import generate, start
from jetspec_jax.head import HeadConfig, init_head_params
from jetspec_jax.model import init_params
from jetspec_jax.step import DecodeConfig, verify_and_commit
from jetspec_jax.tree import TreeConfig, build_tree

TARGET = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                     head_dim=8, intermediate_size=64, qk_norm=True)
HEAD = HeadConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=64, vocab_size=64, num_target_layers=4, mask_token_id=63,
                  block_size=8, target_layer_ids=(1, 2))
PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 12, 40], [11]]


@pytest.fixture(scope="module")
def params():
    return {"target": init_params(TARGET, jax.random.PRNGKey(0)),
            "head": init_head_params(HEAD, jax.random.PRNGKey(1))}


@pytest.fixture(scope="module")
def reference(params):
    """AR greedy ids: the target alone."""
    out = generate({"target": params["target"]}, PROMPTS, DecodeConfig(target=TARGET), max_new_tokens=24)
    return [g.ids for g in out]


@pytest.mark.parametrize("tree", [
    TreeConfig(budget=2, width=1, depth=1, kind="chain"),
    TreeConfig(budget=8, width=1, depth=7, kind="chain"),
    TreeConfig(budget=7, width=4, depth=3),
    TreeConfig(budget=33, width=8, depth=7),
    TreeConfig(budget=64, width=4, depth=7),
])
def test_random_head_is_lossless(params, reference, tree):
    config = DecodeConfig(target=TARGET, head=HEAD, tree=tree)
    out = generate(params, PROMPTS, config, max_new_tokens=24)
    assert [g.ids for g in out] == reference
    assert [sum(g.accept_lengths) for g in out] == [len(r) for r in reference]


@functools.partial(jax.jit, static_argnames=("config",))
def _oracle_round(params, state, draft_logits, config):
    tree = build_tree(state.root, draft_logits, config.tree)
    return verify_and_commit(params, state, tree, config)[0]


def _oracle_logits(reference, num_new, depth, vocab, rank_of_truth, rng):
    """Draft logits whose rank-`rank_of_truth[j]` token at depth j is the true continuation."""
    b = len(reference)
    logits = rng.normal(size=(b, depth, vocab)).astype(np.float32)
    for row in range(b):
        for j in range(depth):
            i = num_new[row] + j
            truth = reference[row][i] if i < len(reference[row]) else 0
            order = np.argsort(-logits[row, j])
            rank = rank_of_truth[row, j]
            # Put the truth at the requested rank by giving it a score between two others.
            others = [t for t in order if t != truth]
            logits[row, j, truth] = logits[row, j, others[rank]] + 1e-3 if rank == 0 else \
                (logits[row, j, others[rank - 1]] + logits[row, j, others[rank]]) / 2
    return jnp.asarray(logits)


def _run_oracle(params, reference, tree, rank_fn, seed=0, return_state=False):
    config = DecodeConfig(target=TARGET, head=HEAD, tree=tree)
    state = start(params, PROMPTS, config, max_new_tokens=24)
    rng = np.random.default_rng(seed)
    while not bool(jnp.all(state.done)):
        num_new = np.asarray(state.num_new)
        ranks = rank_fn(rng, (len(PROMPTS), tree.depth))
        logits = _oracle_logits(reference, num_new, tree.depth, TARGET.vocab_size, ranks, rng)
        state = _oracle_round(params, state, logits, config)
    ids = [np.asarray(state.tokens[b, : state.num_new[b]]).tolist() for b in range(len(PROMPTS))]
    acc = [np.asarray(state.accept_lengths[b, : state.rounds[b]]).tolist() for b in range(len(PROMPTS))]
    return (ids, acc, state) if return_state else (ids, acc)


def test_oracle_drafter_is_accepted_to_full_depth(params, reference):
    tree = TreeConfig(budget=8, width=1, depth=7, kind="chain")
    ids, acc = _run_oracle(params, reference, tree, lambda rng, shape: np.zeros(shape, int))
    assert ids == reference
    for lengths in acc:
        # Every round but the last (cut by max_new_tokens) accepts all D drafts plus the bonus.
        assert all(a == tree.depth + 1 for a in lengths[:-1]), lengths


def test_tree_recovers_second_choices_that_a_chain_misses(params, reference):
    """Truth at rank 0 or 1 at random: a width-2 tree accepts more per round than a chain, and both
    stay exactly equal to the target's greedy output."""
    ranks = lambda rng, shape: (rng.random(shape) < 0.3).astype(int)  # noqa: E731
    chain_ids, chain_acc = _run_oracle(params, reference, TreeConfig(8, 1, 7, kind="chain"), ranks)
    tree_ids, tree_acc = _run_oracle(params, reference, TreeConfig(48, 2, 7), ranks)
    assert chain_ids == reference and tree_ids == reference
    mean = lambda acc: np.mean([a for row in acc for a in row])  # noqa: E731
    assert mean(tree_acc) > mean(chain_acc) + 1.0, (mean(tree_acc), mean(chain_acc))


def test_commit_equals_reprefill_of_the_accepted_prefix(params, reference):
    """After many rounds of deep, branching acceptance, both caches hold exactly what a fresh
    prefill of prompt + generated tokens (all but the root) would hold."""
    ranks = lambda rng, shape: (rng.random(shape) < 0.3).astype(int)  # noqa: E731
    config = DecodeConfig(target=TARGET, head=HEAD, tree=TreeConfig(48, 2, 7))
    ids, _, state = _run_oracle(params, reference, config.tree, ranks, return_state=True)
    fresh = start(params, [p + r for p, r in zip(PROMPTS, ids)], config, max_new_tokens=1)
    np.testing.assert_array_equal(state.target_cache.lengths, fresh.target_cache.lengths)
    np.testing.assert_array_equal(state.root, fresh.root)
    for ours, ref in [(state.target_cache, fresh.target_cache), (state.head_cache, fresh.head_cache)]:
        for b, n in enumerate(np.asarray(ref.lengths)):
            for a, r in zip(ours.k + ours.v, ref.k + ref.v):
                np.testing.assert_allclose(a[b, :, :n], r[b, :, :n], atol=2e-5, rtol=1e-5)


def test_pallas_kernel_inside_the_model_is_lossless(monkeypatch):
    """The whole speculative loop with the Pallas kernel (interpret mode) equals XLA AR decoding."""
    import jetspec_jax.kernels.tree_attn.api as api

    calls = []
    real = api.tree_attention_pallas
    monkeypatch.setattr(api, "tree_attention_pallas", lambda *a, **k: calls.append(1) or real(*a, **k))
    target = TARGET.replace(num_layers=2, head_dim=16)  # the kernel covers power-of-two head dims >= 16
    head = HEAD.replace(head_dim=16, num_target_layers=2, target_layer_ids=(0, 1))
    p = {"target": init_params(target, jax.random.PRNGKey(5)), "head": init_head_params(head, jax.random.PRNGKey(6))}
    ar = generate({"target": p["target"]}, PROMPTS[:2], DecodeConfig(target=target), max_new_tokens=8)
    pallas = DecodeConfig(target=target.replace(attention_impl="pallas_interpret"),
                          head=head.replace(attention_impl="pallas_interpret"), tree=TreeConfig(12, 3, 4))
    out = generate(p, PROMPTS[:2], pallas, max_new_tokens=8)
    assert calls, "the Pallas kernel was never called"
    assert [g.ids for g in out] == [g.ids for g in ar]


@pytest.mark.parametrize("causal", [True, False])
def test_drafting_fewer_depths_keeps_the_draft(params, causal):
    """A round drafts only the depths its tree can reach (N - 1) and a causal head runs only the
    block rows [root, MASK x D]: those depths' logits must equal the full block's."""
    from jetspec_jax.step import draft_logits

    head = HEAD.replace(causal=causal)
    state = start(params, PROMPTS, DecodeConfig(TARGET, head, TreeConfig.chain(7)), max_new_tokens=8)
    full_cfg = DecodeConfig(TARGET, head, TreeConfig.chain(7))
    short_cfg = DecodeConfig(TARGET, head, TreeConfig(budget=4, width=2, depth=7))
    assert (short_cfg.depth, short_cfg.block_rows) == (3, 4 if causal else 8)
    draft = jax.jit(draft_logits, static_argnames="config")
    full, _ = draft(params, state.root, state.head_cache, config=full_cfg)
    short, _ = draft(params, state.root, state.head_cache, config=short_cfg)
    assert short.shape == (len(PROMPTS), 3, TARGET.vocab_size)
    np.testing.assert_allclose(short, full[:, :3], rtol=1e-5, atol=1e-5)
