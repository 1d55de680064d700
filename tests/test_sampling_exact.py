"""Speculative sampling is exact: the first tokens follow the target's own distribution.

The exact AR distribution of the first three generated tokens is enumerated (V^3 sequences) from
the target's logits with an independent numpy implementation of temperature / top-k / top-p; the
speculative sampler's frequencies over >= 200k independent rows must fit it (chi-square). A
deliberately biased acceptance rule must fail the same test, so the test can fail.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import jetspec_jax.decode as decode_module
import jetspec_jax.step as step_module
from jetspec_jax.config import ModelConfig
from jetspec_jax.decode import decode, start
from jetspec_jax.head import HeadConfig, init_head_params
from jetspec_jax.model import Transformer, init_cache, init_params
from jetspec_jax.step import DecodeConfig
from jetspec_jax.tree import TreeConfig

V = 8
TARGET = ModelConfig(vocab_size=V, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                     head_dim=8, intermediate_size=32)
HEAD = HeadConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                  intermediate_size=32, vocab_size=V, num_target_layers=2, mask_token_id=V - 1,
                  block_size=4, target_layer_ids=(0,))
PROMPT = [1, 4, 2]
ROWS, CALLS = 8192, 25  # 204,800 samples


@pytest.fixture(scope="module", autouse=True)
def small_cache():
    """Three new tokens need a few cache slots: a small capacity step keeps 200k rows cheap."""
    saved, decode_module.CAPACITY_STEP = decode_module.CAPACITY_STEP, 16
    yield
    decode_module.CAPACITY_STEP = saved


@pytest.fixture(scope="module")
def params():
    target = init_params(TARGET, jax.random.PRNGKey(0))
    # Sharpen the random model so the distributions are far from uniform.
    target = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 3.0 if path[-1].key in ("kernel", "embedding") else x, target)
    return {"target": target, "head": init_head_params(HEAD, jax.random.PRNGKey(1))}


def processed_probs(logits, temperature, top_k, top_p):
    """numpy: logits / T, keep the top-k, keep the smallest top set with mass >= top_p."""
    z = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(z)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep = np.zeros_like(p, bool)
        keep[order[before < top_p]] = True
        p = np.where(keep, p, 0)
        p /= p.sum()
    return p


def exact_distribution(params, temperature, top_k, top_p, prompt=PROMPT):
    """P(t1, t2, t3) for all V^3 continuations of `prompt`, from full target forwards."""
    pairs = np.array([(a, b) for a in range(V) for b in range(V)])
    seqs = np.concatenate([np.tile(prompt, (len(pairs), 1)), pairs], axis=1)
    n, t = seqs.shape
    logits, _, _ = Transformer(TARGET).apply(
        {"params": params["target"]}, jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(t), (n, t)),
        init_cache(TARGET, n, 16), jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (n, t, t)))
    logits = np.asarray(logits)
    dist = np.zeros((V, V, V))
    for i, (a, b) in enumerate(pairs):
        p1 = processed_probs(logits[i, len(prompt) - 1], temperature, top_k, top_p)[a]
        p2 = processed_probs(logits[i, len(prompt)], temperature, top_k, top_p)[b]
        dist[a, b] = p1 * p2 * processed_probs(logits[i, len(prompt) + 1], temperature, top_k, top_p)
    assert np.isclose(dist.sum(), 1.0)
    return dist.reshape(-1)


def sampled_counts(params, temperature, top_k, top_p, head=HEAD, prompt=PROMPT,
                   tree=TreeConfig(budget=8, width=3, depth=3)):
    config = DecodeConfig(target=TARGET, head=head, tree=tree, sample=True)
    counts = np.zeros(V ** 3, np.int64)
    accepted = []
    for call in range(CALLS):
        state = start(params, [prompt] * ROWS, config, max_new_tokens=3, temperature=temperature,
                      top_k=top_k, top_p=top_p, seed=np.arange(ROWS) + call * ROWS)
        state = decode(params, state, jnp.int32(3), config=config)
        tokens = np.asarray(state.tokens[:, :3])
        counts += np.bincount(tokens[:, 0] * V * V + tokens[:, 1] * V + tokens[:, 2], minlength=V ** 3)
        accepted.append(np.asarray(state.accept_lengths[:, 0]))
    return counts, np.concatenate(accepted)


def chi_square_p(counts, dist):
    expected = dist * counts.sum()
    assert counts[dist == 0].sum() == 0, "sampled a sequence of probability zero"
    big = expected >= 5  # pool the rare cells so the chi-square approximation holds
    rare = ~big & (dist > 0)
    obs, exp = counts[big], expected[big]
    if rare.any():
        obs, exp = np.append(obs, counts[rare].sum()), np.append(exp, expected[rare].sum())
    return scipy.stats.chisquare(obs, exp).pvalue


SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0), (1.2, 0, 0.8)]


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_speculative_sampling_matches_exact_distribution(params, temperature, top_k, top_p):
    counts, first_round = sampled_counts(params, temperature, top_k, top_p)
    assert counts.sum() >= 200_000
    assert np.mean(first_round > 1) > 0.2  # drafts really are accepted: the tree path is exercised
    assert chi_square_p(counts, exact_distribution(params, temperature, top_k, top_p)) > 1e-3


def test_reduced_vocabulary_head_samples_exactly(params):
    """A head drafting over 5 of the 8 ids (never ids 0, 3, 6): the output is still the target's."""
    head = HEAD.replace(draft_vocab_size=5)
    reduced = {**params, "head": {**params["head"], "d2t": jnp.array([7, 2, 5, 1, 4], jnp.int32)}}
    counts, first_round = sampled_counts(reduced, 1.0, 0, 1.0, head=head)
    assert np.mean(first_round > 1) > 0.2
    assert chi_square_p(counts, exact_distribution(params, 1.0, 0, 1.0)) > 1e-3


@pytest.mark.parametrize("lookup", [2, 3])
def test_prompt_lookup_samples_exactly(params, lookup):
    """A prompt that repeats itself, so the lookup branch ("2 1 4" after "1 4") is proposed and
    often accepted next to the head's nodes; with 3 (= 'all' at this depth) it takes every node
    it can where it matches, and the rounds where nothing matches draft the head's own tree."""
    prompt = [1, 4, 2, 1, 4]
    tree = TreeConfig(budget=8, width=3, depth=3, lookup=lookup)
    counts, first_round = sampled_counts(params, 1.0, 0, 1.0, prompt=prompt, tree=tree)
    assert np.mean(first_round > 1) > 0.2
    assert chi_square_p(counts, exact_distribution(params, 1.0, 0, 1.0, prompt=prompt)) > 1e-3


def test_answer_ngram_table_samples_exactly(params):
    """The prompt has no earlier match, so the lookup branch is the answer n-gram table's chain: here
    a table that knows the target's most likely continuation of the prompt (as the shipped table knows
    the target's training answers), so it is proposed and often accepted."""
    from jetspec_jax.ngrams import build_table

    prompt = [5, 1, 4, 2]  # no token repeats: no text match; 4 tokens, so the table knows a long context
    dist = exact_distribution(params, 1.0, 0, 1.0, prompt=prompt)
    likely = np.unravel_index(np.argmax(dist), (V, V, V))
    table = build_table([(np.array(prompt + [int(t) for t in likely]), len(prompt))], (4,))
    with_table = {**params, "head": {**params["head"], "ngram_keys": jnp.asarray(table["keys"]),
                                     "ngram_next": jnp.asarray(table["next"])}}
    tree = TreeConfig(budget=8, width=3, depth=3, lookup=3)
    counts, first_round = sampled_counts(with_table, 1.0, 0, 1.0, prompt=prompt, head=HEAD.replace(ngram_orders=(4,)),
                                         tree=tree)
    # Whenever the target samples that continuation, the round accepts the table's chain whole (3 tokens,
    # the most this run emits), so at least that share of first rounds emits 3.
    assert np.mean(first_round == 3) > 0.9 * dist.max() > 0.05
    assert chi_square_p(counts, dist) > 1e-3


def test_biased_acceptance_is_detected(params, monkeypatch):
    """Negative control: when the target picks the second child of the root, pretend it picked the
    first. Such a rule looks plausible, but shifts probability mass and must fail the test."""
    real_accept = step_module.accept

    def biased_accept(tokens, parents, depths, mask, target_tokens, max_depth):
        second_child = tokens[:, 2]
        root_choice = jnp.where(target_tokens[:, 0] == second_child, tokens[:, 1], target_tokens[:, 0])
        return real_accept(tokens, parents, depths, mask, target_tokens.at[:, 0].set(root_choice), max_depth)

    monkeypatch.setattr(step_module, "accept", biased_accept)
    jax.clear_caches()  # the jitted loop must be retraced with the biased rule
    try:
        counts, _ = sampled_counts(params, 1.0, 0, 1.0)
    finally:
        jax.clear_caches()
    assert chi_square_p(counts, exact_distribution(params, 1.0, 0, 1.0)) < 1e-3
