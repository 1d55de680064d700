"""The published Qwen3-8B head layouts (DFlash and JetSpec) load, and compute what `dflash` computes.

1. The full-size config.json of each published head parses into the right HeadConfig, and its
   tensor names and shapes are exactly those of `dflash`'s model built from the same config (on
   torch's meta device: nothing is allocated).
2. A copy with the same keys but tiny sizes: `dflash`'s model writes random weights, our loader
   reads the directory (with the published config.json written verbatim), and both heads give the
   same hidden states and logits over two rounds (float32).
3. tests/test_gpu_lowering.py lowers the Qwen3-8B programs with the JetSpec head read from its
   published config (`jetspec_jax.lowering.QWEN3_8B_HEAD_HF`).

Where the configs come from. Neither head's config.json itself is in the stored corpora this
project can read (no network beyond PyPI), so each dict is assembled from sources, key by key:

DFlash, z-lab/Qwen3-8B-DFlash-b16 (https://huggingface.co/z-lab/Qwen3-8B-DFlash-b16, listed in
github z-lab/dflash README.md):
- Key set and layout: the config.json z-lab publishes for its DFlash heads, as copied in public
  repositories: SpecForge's configs/qwen3-32b-dflash.json (copy on
  https://huggingface.co/FasterDFlash/Hanrui, progress/github/SpecForge/configs/), the z-lab-format
  Qwen3-4B/Qwen3.5 head configs (HyzeAI/Hyze1B config.json; a tree_flash training script embedding
  a Qwen3-4B-DFlash-b16-style config): `architectures: [DFlashDraftModel]`,
  `auto_map: dflash.DFlashDraftModel`, top-level `block_size`, `num_target_layers`, and
  `dflash_config: {mask_token_id, target_layer_ids}` (no causal flag: DFlash is bidirectional).
- Sizes (hidden 4096, intermediate 12288, 32 / 8 heads, head_dim 128, 5 layers, 36 target layers,
  rope_theta 1e6, vocab 151936, bos / eos): github sgl-project/SpecForge configs/qwen3-8b-dflash.json,
  the config DFlash heads are trained from (it carries no dflash_config).
- mask_token_id 151669 and target_layer_ids [1, 9, 17, 25, 33]: the values the z-lab Qwen3 heads
  carry in the copies above; the taps are also `dflash.model.build_target_layer_ids(36, 5)`.
- NOT FOUND: `transformers_version` (the copies show 4.57.1 / 4.57.3); 4.57.1 is used. No reader
  looks at it.

JetSpec, JetSpec/jetspec-qwen3-8b (https://huggingface.co/JetSpec/jetspec-qwen3-8b, listed in github
hao-ai-lab/JetSpec README.md):
- Keys read by JetSpec's own loader, github hao-ai-lab/JetSpec jetspec/models/draft_head.py
  (`DFlashDraftModel.__init__`, `Qwen3DFlashAttention.__init__`): `dflash_config.causal_head`,
  `dflash_config.target_layer_ids`, `dflash_config.mask_token_id`,
  `dflash_config.target_hidden_size` (optional; absent = hidden_size), top-level `block_size`,
  `num_target_layers`, `layer_types`.
- Layout of the published JetSpec heads: the "observed config essentials" of
  JetSpec/jetspec-Qwen3.6-35B-A3B recorded in a public JetSpec GGUF contract draft:
  `architectures: [DFlashDraftModel]`, `auto_map: dflash.DFlashDraftModel`, top-level
  `block_size: 16`, `dflash_config: {causal_head: true, mask_token_id, target_layer_ids}`,
  `dtype: bfloat16`, `rope_parameters: {rope_theta, rope_type: default}` (transformers-5 spelling,
  no top-level rope_theta).
- Sizes: the JetSpec++ Qwen3-8B card (https://huggingface.co/JetSpec/jetspec-plus-plus-qwen3-8b)
  says its drafter "uses the same format as JetSpec/jetspec-qwen3-8b" and has 1.05B parameters,
  which is exactly 5 Qwen3-8B-sized layers plus a 5-tap fc (test below); the taps and the mask token
  are those of the Qwen3-8B target as above.
- NOT FOUND in the file: the remaining standard keys (attention_bias ... use_sliding_window) are
  transformers-5's serialization of Qwen3Config for these sizes, the same keys as the DFlash file;
  none changes what the head computes except through the checks tested here.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from dflash.model import DFlashDraftModel
from test_head import _append, _block, _dflash_two_rounds, _randomize
from transformers import Qwen3Config

from jetspec_jax.errors import UserError
from jetspec_jax.head import check_head_fits, init_head_cache, init_head_params
from jetspec_jax.loading.head_io import _expected, _hf_name, head_config_from_hf, load_head_dir
from jetspec_jax.lowering import QWEN3_8B, QWEN3_8B_HEAD_HF

DFLASH_QWEN3_8B = {  # z-lab/Qwen3-8B-DFlash-b16 config.json (sources above)
    "architectures": ["DFlashDraftModel"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
    "block_size": 16,
    "bos_token_id": 151643,
    "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]},
    "dtype": "bfloat16",
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "layer_types": ["full_attention"] * 5,
    "max_position_embeddings": 40960,
    "max_window_layers": 5,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 5,
    "num_key_value_heads": 8,
    "num_target_layers": 36,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "transformers_version": "4.57.1",  # not found; see above
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
JETSPEC_QWEN3_8B = QWEN3_8B_HEAD_HF  # JetSpec/jetspec-qwen3-8b config.json, kept where the lowering reads it

PUBLISHED = {"dflash": (DFLASH_QWEN3_8B, False), "jetspec": (JETSPEC_QWEN3_8B, True)}  # name -> (config, causal)
TAPS, MASK = (1, 9, 17, 25, 33), 151669
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
CTX_LENS, NEW_LENS = (5, 9), (3, 1)  # per batch row: first context, rows appended in round 2
CAPACITY = 32  # >= max(CTX + NEW) + block size; the slots never written stay NaN
TOL = 1e-4


def _dflash_model(raw: dict, causal: bool) -> DFlashDraftModel:
    """`dflash`'s model from a config dict, attending as the published head does. dflash 0.1.0
    reads only a top-level `is_causal`, so from a JetSpec config it builds a bidirectional head;
    JetSpec's own loader reads `dflash_config.causal_head` into the same attention flag, which is
    what we set here."""
    model = DFlashDraftModel(Qwen3Config.from_dict(raw))
    assert all(layer.self_attn.is_causal is False for layer in model.layers)
    for layer in model.layers:
        layer.self_attn.is_causal = causal
    return model


# ---------------------------------------------------------------------------------------------
# The full-size configs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PUBLISHED))
def test_full_size_config_parses(name):
    raw, causal = PUBLISHED[name]
    cfg = head_config_from_hf(raw, dtype="bfloat16")
    assert (cfg.num_layers, cfg.target_layer_ids, cfg.num_target_layers) == (5, TAPS, 36)
    assert (cfg.block_size, cfg.mask_token_id, cfg.causal) == (16, MASK, causal)
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size) == (
        4096, 32, 8, 128, 12288)
    assert (cfg.vocab_size, cfg.draft_vocab_size, cfg.rope_theta, cfg.rms_norm_eps, cfg.qkv_bias) == (
        151936, None, 1e6, 1e-6, False)
    check_head_fits(cfg, QWEN3_8B)

    # The tensors it loads: names and shapes exactly those of dflash's model of the same config,
    # 1.05B parameters (the JetSpec++ card's count for this format); nothing is allocated.
    ours = {_hf_name(path): tuple(leaf.shape) for path, leaf in _expected(cfg).items()}
    with torch.device("meta"):
        theirs = {k: tuple(v.shape[::-1]) if v.ndim == 2 else tuple(v.shape)  # torch (out, in)
                  for k, v in DFlashDraftModel(Qwen3Config.from_dict(raw)).state_dict().items()}
    assert ours == theirs
    assert ours["fc.weight"] == (5 * 4096, 4096)  # (in, out): 5 taps of 4096 -> 4096
    count = sum(int(np.prod(s)) for s in ours.values())
    assert round(count / 1e9, 2) == 1.05
    params = jax.eval_shape(lambda: init_head_params(cfg, jax.random.PRNGKey(0)))  # fused q/k/v, gate/up
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)) == count


def _moved_to_top_level(raw):
    out = {k: v for k, v in raw.items() if k != "dflash_config"}
    return {**out, **raw["dflash_config"]}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_other_spellings_of_the_same_head(name):
    """The draft keys at the top level (as some community heads write them); the causal flag as
    vLLM reads it (`dflash_config.causal`, what NeMo's JetSpec export writes) or as `dflash` reads
    it (`is_causal`): the same head."""
    raw, causal = PUBLISHED[name]
    want = head_config_from_hf(raw)
    assert head_config_from_hf(_moved_to_top_level(raw)) == want
    for spelling in ({"dflash_config": {**raw["dflash_config"], "causal": causal}}, {"is_causal": causal}):
        assert head_config_from_hf({**raw, **spelling}) == want


@pytest.mark.parametrize("change, message", [
    ({"dflash_config": {"causal": False}}, "causal_head=True disagrees with dflash_config.causal=False"),
    ({"is_causal": False}, "dflash_config.causal_head=True disagrees with is_causal=False"),
    ({"dflash_config": {"use_swa": True}}, "use_swa"),
    ({"dflash_config": {"attention_sink_bias": True}}, "attention_sink_bias"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"rope_parameters": {"rope_theta": 1000000, "rope_type": "default", "partial_rotary_factor": 0.25}},
     "partial_rotary_factor=0.25"),
    ({"dflash_config": {"target_hidden_size": 2048}}, "target_hidden_size=2048 differs from hidden_size=4096"),
    ({"dflash_config": {"target_layer_ids": "1,9"}}, "invalid literal"),
])
def test_unsupported_published_variants_are_one_line_errors(change, message):
    raw = json.loads(json.dumps(JETSPEC_QWEN3_8B))
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    with pytest.raises(UserError, match=message) as err:
        head_config_from_hf(raw)
    assert "\n" not in str(err.value)


def test_neutral_values_of_those_keys_load():
    nested = {**JETSPEC_QWEN3_8B["dflash_config"], "use_swa": False, "attention_sink_bias": False,
              "target_hidden_size": 4096}
    raw = {**JETSPEC_QWEN3_8B, "dflash_config": nested, "partial_rotary_factor": 1.0}
    assert head_config_from_hf(raw) == head_config_from_hf(JETSPEC_QWEN3_8B)


# ---------------------------------------------------------------------------------------------
# Tiny copies with the same keys: parity with dflash
# ---------------------------------------------------------------------------------------------

def _tiny(raw: dict) -> dict:
    out = {**json.loads(json.dumps(raw)), **TINY}
    assert out.keys() == raw.keys()
    return out


@pytest.fixture(scope="module", params=list(PUBLISHED))
def tiny_head(request, tmp_path_factory):
    """(dflash model, directory holding its weights and the tiny published config.json, causal)."""
    raw, causal = PUBLISHED[request.param]
    tiny = _tiny(raw)
    torch.manual_seed(0)
    model = _dflash_model(tiny, causal).float().eval()
    _randomize(model, seed=1)
    path = tmp_path_factory.mktemp(request.param) / "head"
    model.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(tiny, indent=2))  # the published keys, verbatim
    return model, path, causal


def _our_two_rounds(cfg, params, feats, embs, new_feats, embs2):
    """The batch of len(CTX_LENS) rows through our head, as tests/test_head.py runs it, in a
    cache whose unwritten slots are NaN -> hidden round 1, hidden round 2 (B, Bs, d)."""
    steps = lambda start, n: start[:, None] + jnp.arange(n, dtype=jnp.int32)  # noqa: E731
    cache = init_head_cache(cfg, feats.shape[0], CAPACITY)
    cache = cache.replace(k=tuple(jnp.full_like(k, jnp.nan) for k in cache.k),
                          v=tuple(jnp.full_like(v, jnp.nan) for v in cache.v))
    cache = _append(cfg, params, feats, steps(cache.lengths, feats.shape[1]), cache)
    cache = cache.replace(lengths=jnp.array(CTX_LENS, jnp.int32))
    h1, cache = _block(cfg, params, embs, steps(cache.lengths, cfg.block_size), cache)
    cache = _append(cfg, params, new_feats, steps(cache.lengths, new_feats.shape[1]), cache)
    cache = cache.replace(lengths=cache.lengths + jnp.array(NEW_LENS, jnp.int32))
    h2, _ = _block(cfg, params, embs2, steps(cache.lengths, cfg.block_size), cache)
    return np.asarray(h1), np.asarray(h2)


def test_tiny_published_layout_matches_dflash(tiny_head):
    model, path, causal = tiny_head
    cfg, params = load_head_dir(path)
    assert (cfg.num_layers, cfg.target_layer_ids, cfg.block_size, cfg.causal) == (5, TAPS, 16, causal)
    assert cfg.mask_token_id == model.mask_token_id == MASK
    assert list(model.target_layer_ids) == list(TAPS) and model.block_size == 16

    rng = np.random.default_rng(2)
    d, bs, batch, vocab = cfg.hidden_size, cfg.block_size, len(CTX_LENS), cfg.vocab_size
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    embed = normal(vocab, d)  # the target's embedding table, which embeds [root, MASK x (Bs - 1)]
    w = normal(vocab, d) / d**0.5  # the target's lm_head, (vocab, d) as torch stores it
    lm_head = torch.nn.Linear(d, vocab, bias=False).requires_grad_(False)
    lm_head.weight.copy_(torch.from_numpy(w))

    def block(roots):
        ids = np.full((batch, bs), cfg.mask_token_id)
        ids[:, 0] = roots
        return embed[ids]

    feats, new_feats = normal(batch, max(CTX_LENS), len(TAPS) * d), normal(batch, max(NEW_LENS), len(TAPS) * d)
    embs, embs2 = block(rng.integers(0, vocab, batch)), block(rng.integers(0, vocab, batch))
    h1, h2 = _our_two_rounds(cfg, params, feats, embs, new_feats, embs2)
    for b, (c, a) in enumerate(zip(CTX_LENS, NEW_LENS)):
        refs = _dflash_two_rounds(model, feats[b, :c], embs[b], new_feats[b, :a], embs2[b])
        for ours, ref in zip((h1[b], h2[b]), refs):
            assert np.isfinite(ours).all()
            np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)
            # Logits of the draft rows (row 0 is the root), as dflash_generate computes them.
            with torch.no_grad():
                want = model.compute_logits(torch.from_numpy(ref[1:]), lm_head).numpy()
            got = ours[1:] @ w.T
            np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
