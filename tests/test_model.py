"""Invariances of the target forward: incremental decoding equals one full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetspec_jax.config import ModelConfig
from jetspec_jax.model import Transformer, init_cache, init_params

TINY = dict(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            intermediate_size=48, rope_theta=10000.0)


def _forward(cfg, params, tokens, positions, cache, mask, taps=()):
    return Transformer(cfg).apply({"params": params}, tokens, positions, cache, mask, taps=taps)


def _full(cfg, params, tokens, capacity=64):
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    return _forward(cfg, params, tokens, pos, init_cache(cfg, b, capacity), mask, taps=(0, 1))


@pytest.mark.parametrize("family", [dict(qk_norm=True), dict(qkv_bias=True), dict(tie_embeddings=True)])
def test_step_by_step_equals_full_forward(family):
    cfg = ModelConfig(**TINY, **family)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
    full_logits, full_taps, _ = _full(cfg, params, tokens)

    cache = init_cache(cfg, 2, 64)
    one = jnp.ones((2, 1, 1), bool)
    for i in range(tokens.shape[1]):
        pos = jnp.full((2, 1), i, jnp.int32)
        logits, taps, cache = _forward(cfg, params, tokens[:, i:i + 1], pos, cache, one, taps=(0, 1))
        cache = cache.replace(lengths=cache.lengths + 1)
        np.testing.assert_allclose(logits[:, 0], full_logits[:, i], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(taps[:, 0], full_taps[:, i], atol=1e-5, rtol=1e-5)


def test_chain_verified_at_once_equals_sequential_steps():
    """A prefix in the cache, then 5 tokens in one pass under a causal mask == 5 single steps."""
    cfg = ModelConfig(**TINY, qk_norm=True)
    params = init_params(cfg, jax.random.PRNGKey(2))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 9), 0, cfg.vocab_size)
    full_logits, _, full_cache = _full(cfg, params, tokens)

    _, _, cache = _full(cfg, params, tokens[:, :4])
    cache = cache.replace(lengths=jnp.array([4], jnp.int32))
    chain = tokens[:, 4:]
    pos = jnp.arange(4, 9)[None]
    mask = jnp.tril(jnp.ones((5, 5), bool))[None]
    logits, _, cache = _forward(cfg, params, chain, pos, cache, mask)
    np.testing.assert_allclose(logits, full_logits[:, 4:], atol=1e-5, rtol=1e-5)
    for k_ours, k_full in zip(cache.k, full_cache.k):
        np.testing.assert_allclose(k_ours[:, :, :9], k_full[:, :, :9], atol=1e-6)


def test_unused_cache_slots_never_matter():
    cfg = ModelConfig(**TINY)
    params = init_params(cfg, jax.random.PRNGKey(4))
    tokens = jax.random.randint(jax.random.PRNGKey(5), (1, 6), 0, cfg.vocab_size)
    clean_logits, _, _ = _full(cfg, params, tokens)
    poisoned = init_cache(cfg, 1, 64)
    poisoned = poisoned.replace(k=tuple(jnp.full_like(k, jnp.nan) for k in poisoned.k),
                                v=tuple(jnp.full_like(v, jnp.nan) for v in poisoned.v))
    pos = jnp.arange(6)[None]
    mask = jnp.tril(jnp.ones((6, 6), bool))[None]
    logits, _, _ = _forward(cfg, params, tokens, pos, poisoned, mask)
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_allclose(logits, clean_logits, atol=1e-6)
