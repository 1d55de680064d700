"""What XLA makes of the decoding loop: no weight is copied or transposed inside a round.

A copy of a weight inside the while loop costs a read and a write of that weight every round; for
a tied LM head that is the whole embedding (113 MB per token for SmolLM2-135M on CPU). The check
reads the optimized HLO of the compiled loop, so it holds for whatever XLA version runs it.
"""

import math
import re

import jax
import jax.numpy as jnp
import pytest

from jetspec_jax import decode as decoding
from jetspec_jax.config import ModelConfig
from jetspec_jax.head import HeadConfig, init_head_params
from jetspec_jax.model import init_params
from jetspec_jax.step import DecodeConfig
from jetspec_jax.tree import TreeConfig

TARGET = ModelConfig(vocab_size=1000, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=12, intermediate_size=80, tie_embeddings=True)
HEAD = HeadConfig(hidden_size=48, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=12,
                  intermediate_size=80, vocab_size=1000, num_target_layers=2, mask_token_id=999,
                  block_size=4, target_layer_ids=(0,))
_MOVES = re.compile(r"= f32\[([0-9,]*)\]\{[^}]*\} (copy|transpose)\(")


def moved_shapes(hlo: str) -> set:
    """Shapes of every f32 copy/transpose in an optimized HLO module."""
    return {tuple(int(d) for d in m.group(1).split(",") if d) for m in _MOVES.finditer(hlo)}


@pytest.mark.parametrize("mode", ["ar", "tree"])
def test_no_weight_is_copied_inside_the_loop(mode):
    params = {"target": init_params(TARGET, jax.random.key(0))}
    config = DecodeConfig(target=TARGET)
    if mode == "tree":
        params["head"] = init_head_params(HEAD, jax.random.key(1))
        config = DecodeConfig(target=TARGET, head=HEAD, tree=TreeConfig(budget=4, width=2, depth=3))
    state = decoding.start(params, [[1, 2, 3]], config, max_new_tokens=8)
    hlo = decoding.decode.lower(params, state, jnp.int32(8), config=config).compile().as_text()
    kernels = [tuple(w.shape) for w in jax.tree.leaves(params) if w.ndim >= 2]
    weights = set(kernels) | {(s[0], math.prod(s[1:])) for s in kernels}  # as stored, and as (in, out)
    weights |= {s[::-1] for s in weights}
    moved = moved_shapes(hlo) & weights
    assert not moved, f"weights copied inside the decoding loop: {sorted(moved)}"
    assert (1000, 48) in weights  # the tied embedding is among the weights checked


def test_the_check_sees_a_transposed_copy():
    """The pattern matches a weight copy as XLA prints it (guards the regex against HLO changes)."""
    w = jnp.ones((1000, 48))

    @jax.jit
    def f(w, h):
        return jnp.dot(h, w.T.copy()) + jnp.sum(w.T * 2.0)

    hlo = f.lower(w, jnp.ones((1, 48))).compile().as_text()
    assert (48, 1000) in moved_shapes(hlo)
