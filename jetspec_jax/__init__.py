"""jetspec-jax: lossless speculative decoding with causal parallel tree drafting, in JAX."""
