"""Processed target distribution and sampling, against a numpy version written independently.

`np_processed` follows the written definition step by step in float64 (temperature, top-k keeping
ties at the k-th value, top-p on the renormalised top-k distribution keeping ties with the last kept
token). Frequencies of many draws are compared with it by a chi-square test; a negative control
shows the same test rejects a wrong distribution, so it can fail.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from jetspec_jax import sampling
from jetspec_jax.errors import UserError
from jetspec_jax.sampling import processed_logprobs, sample_tokens, validate_sampling

# Jitted once per shape (as callers use them); op-by-op dispatch would be slower to test.
sample = jax.jit(sample_tokens)
logprobs = jax.jit(processed_logprobs)


def np_processed(logits, temperature, top_k, top_p):
    """One row of logits (V,) -> float64 probabilities (V,) of the processed distribution."""
    x = np.asarray(logits, np.float64)
    if temperature == 0:
        return np.eye(len(x))[np.argmax(x)]
    x = x / temperature
    if top_k > 0:
        kth = np.sort(x)[::-1][min(top_k, len(x)) - 1]
        x = np.where(x >= kth, x, -np.inf)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if top_p < 1:
        order = np.argsort(-x, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        assert np.all(np.abs(before - top_p) > 1e-5), "top_p too close to a running mass (float32)"
        last_kept = x[order][before < top_p][-1]
        x = np.where(x >= last_kept, x, -np.inf)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
    return probs


def rows(settings):
    """[(temperature, top_k, top_p)] -> three (B,) arrays."""
    t, k, p = zip(*settings)
    return jnp.array(t, jnp.float32), jnp.array(k, jnp.int32), jnp.array(p, jnp.float32)


def keys(seed, batch):
    return jax.random.split(jax.random.key(seed), batch)


SETTINGS = [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 3, 1.0), (0.8, 0, 0.7), (1.3, 5, 0.6)]


@pytest.fixture(params=["sorted", "bisected"])
def logprobs_by(request, monkeypatch):
    """processed_logprobs with the CPU cut-off (a sort) or the GPU one (bisections, no sort), the
    latter run here by standing it in for the CPU branch."""
    if request.param == "bisected":
        monkeypatch.setattr(sampling, "_sorted_cutoff_when_needed", sampling._bisected_cutoff)
    return jax.jit(lambda *args: processed_logprobs(*args))  # a new function: traced afresh


def test_processed_logprobs_match_numpy(logprobs_by):
    # V = 300 spans several 128-token blocks of the two-level running sums.
    logits = np.random.default_rng(0).normal(size=(len(SETTINGS) + 1, 4, 300)).astype(np.float32)
    settings = SETTINGS + [(0.0, 0, 1.0)]
    got = np.asarray(logprobs_by(jnp.asarray(logits), *rows(settings)))
    for b, (t, k, p) in enumerate(settings):
        for n in range(4):
            expected = np_processed(logits[b, n], t, k, p)
            np.testing.assert_array_equal(np.isfinite(got[b, n]), expected > 0)
            np.testing.assert_allclose(np.exp(got[b, n]), expected, rtol=1e-5, atol=1e-7)


def test_processed_logprobs_match_hugging_face_warpers(logprobs_by):
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = np.random.default_rng(4).normal(size=(len(SETTINGS), 8, 300)).astype(np.float32) * 2
    got = np.exp(np.asarray(logprobs_by(jnp.asarray(logits), *rows(SETTINGS))))
    for b, (t, k, p) in enumerate(SETTINGS):
        scores = torch.from_numpy(logits[b])
        warpers = [lp.TemperatureLogitsWarper(t)]
        warpers += [lp.TopKLogitsWarper(k)] if k > 0 else []
        warpers += [lp.TopPLogitsWarper(p)] if p < 1 else []
        for warp in warpers:
            scores = warp(None, scores)
        expected = torch.softmax(scores, dim=-1).numpy()
        np.testing.assert_array_equal(got[b] > 0, expected > 0)
        np.testing.assert_allclose(got[b], expected, rtol=1e-5, atol=1e-7)


def test_top_k_keeps_ties_at_the_kth_value(logprobs_by):
    logits = jnp.array([[[3.0, 1.0, 2.0, 2.0, 0.0]]])
    got = logprobs_by(logits, *rows([(1.0, 2, 1.0)]))
    np.testing.assert_array_equal(np.isfinite(got[0, 0]), [True, False, True, True, False])


def test_top_p_keeps_ties_with_the_last_kept_token(logprobs_by):
    # Probabilities (0.42, 0.155, 0.155, 0.155, 0.057, 0.058): sorted, preceding masses 0, 0.42, 0.575,
    # 0.73, ...: p = 0.5 keeps the first two by the sorted rule, then the two tied with the second.
    logits = jnp.log(jnp.array([[[0.42, 0.155, 0.155, 0.155, 0.057, 0.058]]]))
    got = logprobs_by(logits, *rows([(1.0, 0, 0.5)]))
    np.testing.assert_array_equal(np.isfinite(got[0, 0]), [True, True, True, True, False, False])


def test_sort_free_cutoff_equals_the_sorted_one():
    """The GPU cut-off against the CPU one on many rows: ties, -inf logits, ranks past the
    vocabulary, tiny and full p, -0.0 next to +0.0."""
    rng = np.random.default_rng(7)
    b, n, v = 6, 16, 700
    x = rng.normal(size=(b, n, v)).astype(np.float32) * rng.uniform(0.5, 4, size=(b, n, 1)).astype(np.float32)
    x[:, :4] = np.round(x[:, :4])  # heavy ties
    x[:, 4:6, : v // 2] = -np.inf  # masked tokens
    x[:, 6, :2] = [0.0, -0.0]
    top_k = jnp.array([0, 1, 7, 50, 699, 5000], jnp.int32)
    top_p = jnp.array([1.0, 0.3, 0.9, 0.999, 0.05, 0.6], jnp.float32)
    x = jnp.asarray(x)
    sorted_cut = jax.jit(sampling._top_k_top_p_cutoff)(x, top_k, top_p)
    bisected = jax.jit(sampling._bisected_cutoff)(x, jnp.ones(b), top_k, top_p)
    np.testing.assert_array_equal(np.asarray(x >= bisected), np.asarray(x >= sorted_cut))
    assert 0 < float(jnp.mean(x >= sorted_cut)) < 1  # the rows really cut


def test_ordered_bits_keep_the_float_order():
    x = jnp.array([-jnp.inf, -3.0e38, -1.0, -1e-40, -0.0, 0.0, 1e-40, 1.0, 3.0e38, jnp.inf], jnp.float32)
    keys = np.asarray(sampling._ordered_bits(x)).astype(np.int64)
    assert np.all(np.diff(keys) > 0) and keys.min() >= 1


def test_same_key_same_tokens_and_different_key_different_tokens():
    logits = jax.random.normal(jax.random.key(0), (3, 64, 100))
    t, k, p = rows([(1.0, 0, 1.0), (0.7, 10, 1.0), (1.0, 0, 0.9)])
    first = sample(keys(1, 3), logits, t, k, p)
    chex.assert_shape(first, (3, 64))
    chex.assert_type(first, jnp.int32)
    np.testing.assert_array_equal(first, sample(keys(1, 3), logits, t, k, p))
    assert not np.array_equal(first, sample(keys(2, 3), logits, t, k, p))


def test_raw_uint32_keys_are_accepted():
    logits = jax.random.normal(jax.random.key(0), (2, 8, 30))
    raw = jax.random.split(jax.random.PRNGKey(3), 2)  # (2, 2) uint32
    assert raw.dtype == jnp.uint32
    ids = sample(raw, logits, *rows([(1.0, 0, 1.0), (1.0, 0, 1.0)]))
    np.testing.assert_array_equal(ids, sample(raw, logits, *rows([(1.0, 0, 1.0)] * 2)))


def test_never_samples_outside_top_k_top_p():
    rng = np.random.default_rng(1)
    settings = [(1.0, 1, 1.0), (2.0, 4, 1.0), (1.5, 0, 0.5), (3.0, 6, 0.8), (0.9, 0, 0.95)]
    logits = rng.normal(size=(len(settings), 32, 300)).astype(np.float32) * 3
    allowed = np.array([[np_processed(logits[b, n], *s) > 0 for n in range(32)]
                        for b, s in enumerate(settings)])  # (B, N, V)
    assert np.all(allowed.sum(-1) < 300)  # every row really excludes tokens
    sample_many = jax.jit(jax.vmap(sample_tokens, in_axes=(0, None, None, None, None)))
    many_keys = jax.random.split(jax.random.key(5), (200, len(settings)))
    ids = np.asarray(sample_many(many_keys, jnp.asarray(logits), *rows(settings)))  # (200, B, N)
    hit = np.take_along_axis(allowed[None], ids[..., None], axis=-1)[..., 0]
    assert hit.all(), f"{(~hit).sum()} draws outside the allowed set"


def test_greedy_rows_are_argmax():
    logits = jax.random.normal(jax.random.key(0), (3, 64, 100))
    ids = sample(keys(0, 3), logits, *rows([(0.0, 0, 1.0), (1.0, 0, 1.0), (0.0, 5, 0.5)]))
    np.testing.assert_array_equal(ids[0], np.argmax(logits[0], -1))
    np.testing.assert_array_equal(ids[2], np.argmax(logits[2], -1))
    assert not np.array_equal(ids[1], np.argmax(logits[1], -1))  # row 1 really samples


def test_greedy_ties_take_the_lowest_id():
    logits = jnp.array([[[1.0, 5.0, 5.0, 2.0]]])
    assert int(sample(keys(0, 1), logits, *rows([(0.0, 0, 1.0)]))[0, 0]) == 1


DRAWS = 100_000


@pytest.mark.parametrize("setting", [(0.7, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.75), (0.8, 5, 0.9)])
def test_frequencies_match_processed_distribution(setting):
    logits = np.random.default_rng(2).normal(size=8).astype(np.float32) * 1.5
    counts = draw_counts(logits, setting, seed=11)
    expected = np_processed(logits, *setting)
    assert np.all(counts[expected == 0] == 0)
    support = expected > 0
    _, p_value = chisquare(counts[support], DRAWS * expected[support])
    assert p_value > 1e-3, f"p = {p_value:.2e}"


def test_frequencies_match_over_several_vocabulary_blocks():
    # V = 300: sampling picks a 128-token block, then a token inside it; both levels are tested.
    logits = np.random.default_rng(3).normal(size=300).astype(np.float32)
    many = jnp.broadcast_to(jnp.asarray(logits), (1, DRAWS, 300))
    ids = sample(keys(12, 1), many, *rows([(1.0, 0, 1.0)]))
    counts = np.bincount(np.asarray(ids).ravel(), minlength=300)
    _, p_value = chisquare(counts, DRAWS * np_processed(logits, 1.0, 0, 1.0))
    assert p_value > 1e-3, f"p = {p_value:.2e}"


def test_chi_square_rejects_a_wrong_distribution():
    # Negative control: draws at temperature 0.5, tested against the temperature-1 distribution
    # (what sampling would give if it ignored the temperature). The test must reject it.
    logits = np.random.default_rng(2).normal(size=8).astype(np.float32) * 1.5
    counts = draw_counts(logits, (0.5, 0, 1.0), seed=11)
    _, p_value = chisquare(counts, DRAWS * np_processed(logits, 1.0, 0, 1.0))
    assert p_value < 1e-6


def draw_counts(logits, setting, seed):
    """DRAWS draws from one row of 8 logits, as DRAWS nodes of a single batch row."""
    many = jnp.broadcast_to(jnp.asarray(logits), (1, DRAWS, 8))
    ids = sample(keys(seed, 1), many, *rows([setting]))
    return np.bincount(np.asarray(ids).ravel(), minlength=8)


def test_no_recompile_when_values_change():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(key, logits, t, k, p):
        return sample_tokens(key, logits, t, k, p), processed_logprobs(logits, t, k, p)

    logits = jax.random.normal(jax.random.key(0), (2, 4, 20))
    for setting in [(1.0, 0, 1.0), (0.3, 5, 1.0), (0.0, 0, 0.4), (2.0, 7, 0.9)]:
        jax.block_until_ready(run(keys(0, 2), logits, *rows([setting, setting])))


@pytest.mark.parametrize(
    "values,message",
    [
        ((-0.1, 0, 1.0), "--temperature must be a finite number >= 0"),
        ((float("nan"), 0, 1.0), "--temperature must be a finite number >= 0"),
        ((1.0, -1, 1.0), "--top-k must be a whole number >= 0"),
        ((1.0, 2.5, 1.0), "--top-k must be a whole number >= 0"),
        ((1.0, 0, 0.0), r"--top-p must be in \(0, 1\]"),
        ((1.0, 0, 1.5), r"--top-p must be in \(0, 1\]"),
    ],
)
def test_validate_sampling_rejects_bad_values(values, message):
    with pytest.raises(UserError, match=message):
        validate_sampling(*values)


def test_validate_sampling_accepts_arrays_of_good_values():
    validate_sampling(np.array([0.0, 0.7]), np.array([0, 40]), np.array([1.0, 0.9]))


def test_make_sampling_keys_are_jax_random_keys_of_the_seeds():
    """make_sampling builds the threefry keys on the host ([0, seed]); they must be exactly the
    keys jax.random.key gives for the same seeds, or sampled outputs would change with it."""
    from jetspec_jax.decode import make_sampling

    seeds = [0, 1, 7, 12345, 2**31 - 1, 2**31, 2**32 - 1]
    got = make_sampling(len(seeds), temperature=1.0, seed=seeds).key
    want = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
    assert jax.random.key_impl(got) == jax.random.key_impl(want)
    one = make_sampling(3, seed=5).key  # a scalar seed, broadcast to every row
    np.testing.assert_array_equal(jax.random.key_data(one), jax.random.key_data(jnp.stack([jax.random.key(5)] * 3)))
