"""Shared fixtures: tiny random HF checkpoints and the real SmolLM2 GGUF.

    def test_x(tiny_hf_models):      # {"qwen3": Path, "qwen2": Path, "llama": Path}
    def test_y(make_tiny_hf):        # make_tiny_hf("qwen3", tie_word_embeddings=True) -> Path
    def test_z(smollm2_gguf):        # Path of the verified SmolLM2-135M-Instruct Q4_1 GGUF
    def test_w(smollm2_model):       # load_model("smollm2-135m"): config, params, tokenizer, eos_ids

torch and transformers are imported only by the fixtures that need them.
"""

from __future__ import annotations

import itertools
import os

import pytest

# The CLI keeps compiled programs in $JETSPEC_CACHE/xla between runs. Tests that call it in this
# process would then read programs compiled by earlier test sessions (and compile-count tests would
# see cache hits instead of compiles); test_compilation_cache turns it on in its own subprocesses.
os.environ.setdefault("JETSPEC_COMPILATION_CACHE", "0")

# Small enough to build in well under a second, large enough for GQA (4 query / 2 kv heads).
TINY_DIMS = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=96, rope_theta=5000.0, rms_norm_eps=1e-6,
                 max_position_embeddings=256)
TINY_FAMILIES = {  # family -> the distinguishing options each test model has
    "qwen3": dict(head_dim=32, tie_word_embeddings=False),  # qk norm, head_dim != hidden/heads
    "qwen2": dict(tie_word_embeddings=False),  # q/k/v biases
    "llama": dict(tie_word_embeddings=True),  # tied embeddings
}


@pytest.fixture(scope="session")
def make_tiny_hf(tmp_path_factory):
    """Factory: make_tiny_hf(family, max_shard_size=None, **config_overrides) -> HF directory.

    A float32 random model from transformers' own config class, saved with `save_pretrained`.
    Norm weights and biases are randomized too (HF initializes them to 1 and 0, which would hide
    a mix-up between them). Weights use std 0.2 so attention is far from uniform.
    """
    import torch
    import transformers

    classes = {"qwen3": transformers.Qwen3Config, "qwen2": transformers.Qwen2Config,
               "llama": transformers.LlamaConfig}
    counter = itertools.count()

    def make(family: str, max_shard_size: str | None = None, **overrides):
        config = classes[family](**{**TINY_DIMS, **TINY_FAMILIES[family], "initializer_range": 0.2, **overrides})
        torch.manual_seed(next(counter))
        model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(0.2 * torch.randn_like(p))
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, **kwargs)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_hf_models(make_tiny_hf):
    """{"qwen3": dir, "qwen2": dir, "llama": dir} of tiny random HF checkpoints."""
    return {family: make_tiny_hf(family) for family in TINY_FAMILIES}


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The SmolLM2-135M-Instruct Q4_1 GGUF, fetched once by the registry into the cache."""
    from jetspec_jax.loading.registry import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_model(smollm2_gguf):
    """The SmolLM2 LoadedModel in float32 (loaded once per session, ~2 s)."""
    from jetspec_jax.loading import load_model

    return load_model("smollm2-135m")
