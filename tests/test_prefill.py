"""Chunked prefill: a long prompt run through the target in static chunks gives the same state,
and the same tokens after it, as one pass over the whole prompt (which builds a (B, P, P) mask)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetspec_jax import decode as decoding
from jetspec_jax.config import ModelConfig
from jetspec_jax.head import HeadConfig, init_head_params
from jetspec_jax.model import init_params
from jetspec_jax.step import DecodeConfig
from jetspec_jax.tree import TreeConfig

TARGET = ModelConfig(vocab_size=300, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                     head_dim=8, intermediate_size=64, qk_norm=True)
HEAD = HeadConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                  vocab_size=300, num_target_layers=3, mask_token_id=299, block_size=5, target_layer_ids=(0, 2))
CONFIG = DecodeConfig(target=TARGET, head=HEAD, tree=TreeConfig(budget=6, width=2, depth=4))


def _state(params, prompts, chunk):
    state = decoding.start(params, prompts, CONFIG, max_new_tokens=12)  # one pass: bucket 64 <= 512
    if chunk is None:
        return state
    b, p = len(prompts), 64
    prompt = np.zeros((b, p), np.int32)
    for i, row in enumerate(prompts):
        prompt[i, : len(row)] = row
    lens = jnp.asarray([len(r) for r in prompts], jnp.int32)
    return decoding.prefill(params, jnp.asarray(prompt), lens, jnp.full((b,), 12, jnp.int32), state.sampling,
                            config=CONFIG, capacity=state.history.shape[1], chunk=chunk)


def test_chunked_prefill_equals_one_pass():
    params = {"target": init_params(TARGET, jax.random.key(0)), "head": init_head_params(HEAD, jax.random.key(1))}
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 299, 61).tolist(), rng.integers(0, 299, 37).tolist()]  # bucket 64
    whole, chunked = _state(params, prompts, None), _state(params, prompts, 16)  # 4 chunks of 16
    assert whole.history.shape == chunked.history.shape
    np.testing.assert_array_equal(whole.root, chunked.root)
    np.testing.assert_array_equal(whole.target_cache.lengths, chunked.target_cache.lengths)
    for cache in ("target_cache", "head_cache"):
        for name in ("k", "v"):
            for a, b in zip(getattr(getattr(whole, cache), name), getattr(getattr(chunked, cache), name)):
                for row, n in enumerate([61, 37]):  # the committed slots (padding rows are scratch)
                    np.testing.assert_allclose(a[row, :, :n], b[row, :, :n], atol=2e-5, rtol=0)
    ids = [decoding.results(decoding.decode(params, s, jnp.int32(12), config=CONFIG)) for s in (whole, chunked)]
    assert [g.ids for g in ids[0]] == [g.ids for g in ids[1]] and all(len(g.ids) == 12 for g in ids[0])


def test_chunk_must_divide_the_bucket():
    params = {"target": init_params(TARGET, jax.random.key(0)), "head": init_head_params(HEAD, jax.random.key(1))}
    with pytest.raises(ValueError, match="whole number of 24-token chunks"):
        _state(params, [[1] * 40], 24)
