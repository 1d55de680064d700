"""Draft head: parity with the `dflash` package (torch, float32), checkpoint I/O, fit checks.

The reference is `dflash.model.DFlashDraftModel` 0.1.0 run as `dflash_generate` runs it: one call
with the context features and the block, then the cache cropped back to the context; the next
round feeds only the new context rows with positions continuing.
"""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from dflash.model import DFlashDraftModel
from transformers import DynamicCache, Qwen3Config

from jetspec_jax.cache import KVCache
from jetspec_jax.config import ModelConfig
from jetspec_jax.errors import UserError
from jetspec_jax.head import (DraftHead, HeadConfig, check_head_fits, default_target_layer_ids,
                              init_head_cache, init_head_params)
from jetspec_jax.loading.head_io import load_head_dir, save_head_dir

D, VOCAB, BLOCK, TAPS, MASK = 64, 128, 8, (1, 3), 127
ROPE_THETA = 50000.0  # not the Qwen3Config default, so a misread theta shows
CTX_LENS, NEW_LENS = (5, 9), (3, 1)  # per batch row: first context, rows appended in round 2
CAPACITY = 24  # >= max(CTX + NEW) + BLOCK; the slots never written stay NaN
TOL = 1e-4

VARIANTS = {  # name -> (causal, attention_bias)
    "causal": (True, False),
    "bidirectional": (False, False),
    "causal_bias": (True, True),
}


# ---------------------------------------------------------------------------------------------
# Reference heads (torch)
# ---------------------------------------------------------------------------------------------

def _qwen3_head_config(causal: bool, attention_bias: bool) -> Qwen3Config:
    return Qwen3Config(
        hidden_size=D, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, vocab_size=VOCAB, rms_norm_eps=1e-6,
        attention_bias=attention_bias, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        num_target_layers=6, block_size=BLOCK, is_causal=causal,
        dflash_config={"target_layer_ids": list(TAPS), "mask_token_id": MASK, "causal_head": causal},
    )


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights at unit-ish scale, norm weights away from 1, so every parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif p.ndim == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(noise * p.shape[1] ** -0.5)


@pytest.fixture(scope="module", params=list(VARIANTS))
def reference(request, tmp_path_factory):
    """(dflash model, its saved directory, variant name)."""
    causal, bias = VARIANTS[request.param]
    torch.manual_seed(0)
    model = DFlashDraftModel(_qwen3_head_config(causal, bias)).eval()
    _randomize(model, seed=1)
    path = tmp_path_factory.mktemp(request.param) / "head"
    model.save_pretrained(path)
    return model, path, request.param


def _dflash_two_rounds(model, feats, embs, new_feats, embs2):
    """One batch row through dflash. feats (c, F), embs (Bs, d), new_feats (a, F), embs2 (Bs, d)
    -> hidden round 1 (Bs, d), hidden round 2 (Bs, d), as numpy."""
    t = lambda x: torch.from_numpy(np.asarray(x))[None]  # noqa: E731
    c, a, bs = feats.shape[0], new_feats.shape[0], embs.shape[0]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        h1 = model(target_hidden=t(feats), noise_embedding=t(embs),
                   position_ids=torch.arange(0, c + bs)[None], past_key_values=cache, use_cache=True)
        cache.crop(-bs)  # drop the block rows, keep the context (as dflash_generate does)
        h2 = model(target_hidden=t(new_feats), noise_embedding=t(embs2),
                   position_ids=torch.arange(c, c + a + bs)[None], past_key_values=cache, use_cache=True)
    return h1[0].numpy(), h2[0].numpy()


# ---------------------------------------------------------------------------------------------
# Ours (JAX)
# ---------------------------------------------------------------------------------------------

def _nan_cache(cfg: HeadConfig, batch: int) -> KVCache:
    """A cache whose every slot is NaN until written: unwritten slots must never matter."""
    cache = init_head_cache(cfg, batch, CAPACITY)
    nan = lambda x: jnp.full_like(x, jnp.nan)  # noqa: E731
    return cache.replace(k=tuple(map(nan, cache.k)), v=tuple(map(nan, cache.v)))


def _our_two_rounds(cfg, params, feats, ctx_lens, embs, new_feats, new_lens, embs2):
    """feats (B, T1, F) with row b valid up to ctx_lens[b]; new_feats (B, T2, F) valid up to
    new_lens[b]; embs, embs2 (B, Bs, d) -> hidden round 1, hidden round 2 (B, Bs, d), cache."""
    steps = lambda start, n: start[:, None] + jnp.arange(n, dtype=jnp.int32)  # noqa: E731
    cache = _nan_cache(cfg, feats.shape[0])
    cache = _append(cfg, params, feats, steps(cache.lengths, feats.shape[1]), cache)
    cache = cache.replace(lengths=ctx_lens)  # commit only the valid rows of each batch row
    h1, cache = _block(cfg, params, embs, steps(cache.lengths, BLOCK), cache)
    cache = _append(cfg, params, new_feats, steps(cache.lengths, new_feats.shape[1]), cache)
    cache = cache.replace(lengths=cache.lengths + new_lens)
    h2, cache = _block(cfg, params, embs2, steps(cache.lengths, BLOCK), cache)
    return np.asarray(h1), np.asarray(h2), cache


@functools.partial(jax.jit, static_argnums=0)
def _append(cfg, params, features, positions, cache):
    return DraftHead(cfg).apply({"params": params}, features, positions, cache,
                                method=DraftHead.append_context)


@functools.partial(jax.jit, static_argnums=0)
def _block(cfg, params, embeddings, positions, cache):
    return DraftHead(cfg).apply({"params": params}, embeddings, positions, cache)


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    f = len(TAPS) * D
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    batch = len(CTX_LENS)
    return (normal(batch, max(CTX_LENS), f), normal(batch, BLOCK, D),
            normal(batch, max(NEW_LENS), f), normal(batch, BLOCK, D))


# ---------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------

def test_loaded_config_matches_reference(reference):
    model, path, name = reference
    cfg, _ = load_head_dir(path)
    causal, bias = VARIANTS[name]
    assert (cfg.causal, cfg.qkv_bias) == (causal, bias)
    assert all(layer.self_attn.is_causal == causal for layer in model.layers)
    assert cfg.target_layer_ids == tuple(model.target_layer_ids) == TAPS
    assert (cfg.block_size, cfg.mask_token_id, cfg.num_target_layers) == (BLOCK, MASK, 6)
    assert cfg.rope_theta == ROPE_THETA


def test_two_rounds_match_dflash(reference):
    """Round 1 (fresh context) and round 2 (cached context + appended rows), batch of 2 rows
    with different context lengths, each row compared with dflash run on that row alone."""
    model, path, _ = reference
    cfg, params = load_head_dir(path)
    feats, embs, new_feats, embs2 = _inputs(seed=2)
    ctx_lens, new_lens = jnp.array(CTX_LENS, jnp.int32), jnp.array(NEW_LENS, jnp.int32)
    h1, h2, cache = _our_two_rounds(cfg, params, feats, ctx_lens, embs, new_feats, new_lens, embs2)

    # The test only proves NaN-safety if unwritten slots really are NaN at the end.
    assert np.isnan(np.asarray(cache.k[0][:, :, -1])).all()
    lm_head = np.random.default_rng(3).standard_normal((D, VOCAB)).astype(np.float32) / D**0.5
    for b, (c, a) in enumerate(zip(CTX_LENS, NEW_LENS)):
        r1, r2 = _dflash_two_rounds(model, feats[b, :c], embs[b], new_feats[b, :a], embs2[b])
        for ours, ref in ((h1[b], r1), (h2[b], r2)):
            assert np.isfinite(ours).all()
            np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)
            np.testing.assert_allclose(ours[1:] @ lm_head, ref[1:] @ lm_head, rtol=0, atol=TOL)


def test_causal_block_rows_ignore_later_rows(reference):
    """Causal head: changing block row j leaves rows < j unchanged; bidirectional: it does not."""
    _, path, name = reference
    cfg, params = load_head_dir(path)
    feats, embs, new_feats, embs2 = _inputs(seed=4)
    ctx_lens, new_lens = jnp.array(CTX_LENS, jnp.int32), jnp.array(NEW_LENS, jnp.int32)
    h1, _, _ = _our_two_rounds(cfg, params, feats, ctx_lens, embs, new_feats, new_lens, embs2)
    embs_changed = embs.copy()
    embs_changed[:, 5] += 1.0
    g1, _, _ = _our_two_rounds(cfg, params, feats, ctx_lens, embs_changed, new_feats, new_lens, embs2)
    early_same = np.array_equal(h1[:, :5], g1[:, :5])
    assert early_same == VARIANTS[name][0]
    assert not np.allclose(h1[:, 5:], g1[:, 5:])


# ---------------------------------------------------------------------------------------------
# Checkpoint I/O
# ---------------------------------------------------------------------------------------------

def test_save_round_trip_loads_in_dflash(reference, tmp_path):
    model, path, _ = reference
    cfg, params = load_head_dir(path)
    out = tmp_path / "ours"
    save_head_dir(out, cfg, params)

    cfg2, params2 = load_head_dir(out)
    assert cfg2 == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)

    reloaded, info = DFlashDraftModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched tensors
    ref_state, new_state = model.state_dict(), reloaded.state_dict()
    assert ref_state.keys() == new_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], new_state[k]), k
    assert all(layer.self_attn.is_causal == cfg.causal for layer in reloaded.layers)
    assert list(reloaded.target_layer_ids) == list(cfg.target_layer_ids)
    assert (reloaded.block_size, reloaded.mask_token_id) == (cfg.block_size, cfg.mask_token_id)
    assert reloaded.config.rope_parameters["rope_theta"] == cfg.rope_theta == ROPE_THETA


def test_save_refuses_existing_dir_unless_overwrite(tmp_path):
    cfg = _tiny_cfg()
    params = init_head_params(cfg, jax.random.PRNGKey(0))
    save_head_dir(tmp_path / "h", cfg, params)
    with pytest.raises(UserError, match="already exists"):
        save_head_dir(tmp_path / "h", cfg, params)
    save_head_dir(tmp_path / "h", cfg.replace(causal=False), params, overwrite=True)
    assert load_head_dir(tmp_path / "h")[0].causal is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h"]  # no temporary leftovers


def _tiny_cfg(**changes) -> HeadConfig:
    base = dict(hidden_size=D, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                intermediate_size=128, vocab_size=VOCAB, num_target_layers=6, mask_token_id=MASK,
                block_size=BLOCK, target_layer_ids=TAPS)
    return HeadConfig(**{**base, **changes})


def _edit_config(**changes):
    def edit(path):
        raw = json.loads((path / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                raw.pop(key, None)
            else:
                raw[key] = value
        (path / "config.json").write_text(json.dumps(raw))
    return edit


def _add_tensor(name):
    def edit(path):
        from safetensors.flax import load_file, save_file
        tensors = load_file(str(path / "model.safetensors"))
        if name is None:
            del tensors["norm.weight"]
        else:
            tensors[name] = jnp.zeros((2,))
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return edit


def _conflicting_causal_flags(path):
    raw = json.loads((path / "config.json").read_text())
    raw["dflash_config"]["causal_head"] = not raw["is_causal"]
    (path / "config.json").write_text(json.dumps(raw))


BROKEN = {  # name -> (how to break a good head directory, expected message)
    "no_config": (lambda p: (p / "config.json").unlink(), "config.json: no such file"),
    "bad_json": (lambda p: (p / "config.json").write_text("{nope"), "unreadable JSON"),
    "no_weights": (lambda p: (p / "model.safetensors").unlink(), "no model.safetensors"),
    "corrupt_weights": (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 64), "unreadable safetensors"),
    "missing_field": (_edit_config(head_dim=None), "missing head_dim"),
    "no_mask_token": (_edit_config(dflash_config={"target_layer_ids": list(TAPS)}), "mask_token_id"),
    "causal_conflict": (_conflicting_causal_flags, "disagrees with is_causal"),
    "sliding": (_edit_config(layer_types=["full_attention", "sliding_attention"]), "sliding-window"),
    "shape": (_edit_config(hidden_size=32, head_dim=8), "has shape"),
    "missing_tensor": (_add_tensor(None), r"missing tensors \['norm.weight'\]"),
    "extra_tensor": (_add_tensor("candidate_selector.x"), "unexpected tensors"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_load_errors_are_one_line(name, tmp_path):
    cfg = _tiny_cfg()
    good = tmp_path / "good"
    save_head_dir(good, cfg, init_head_params(cfg, jax.random.PRNGKey(0)))
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    breaker, message = BROKEN[name]
    breaker(broken)
    with pytest.raises(UserError, match=message) as err:
        load_head_dir(broken)
    assert "\n" not in str(err.value)


def test_load_sharded_checkpoint(tmp_path):
    """Weights split over shards listed in model.safetensors.index.json load like one file."""
    from safetensors.flax import load_file, save_file
    cfg = _tiny_cfg()
    params = init_head_params(cfg, jax.random.PRNGKey(0))
    save_head_dir(tmp_path / "h", cfg, params)
    tensors = load_file(str(tmp_path / "h" / "model.safetensors"))
    (tmp_path / "h" / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(tmp_path / "h" / file), metadata={"format": "pt"})
    weight_map = {n: file for file, part in shards.items() for n in part}
    (tmp_path / "h" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg2, params2 = load_head_dir(tmp_path / "h")
    assert cfg2 == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_load_missing_directory(tmp_path):
    with pytest.raises(UserError, match="not a draft-head directory"):
        load_head_dir(tmp_path / "nowhere")


def test_fc_shape_mismatch_is_reported(tmp_path):
    cfg = _tiny_cfg()
    params = init_head_params(cfg, jax.random.PRNGKey(0))
    save_head_dir(tmp_path / "h", cfg, params)
    from safetensors.flax import load_file, save_file
    tensors = load_file(str(tmp_path / "h" / "model.safetensors"))
    tensors["fc.weight"] = tensors["fc.weight"][:, :D]  # one tap instead of two
    save_file(tensors, str(tmp_path / "h" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"fc.weight has shape \(64, 64\), the config implies \(64, 128\)"):
        load_head_dir(tmp_path / "h")


# ---------------------------------------------------------------------------------------------
# Config and fit
# ---------------------------------------------------------------------------------------------

def test_default_target_layer_ids_match_dflash():
    from dflash.model import build_target_layer_ids
    for num_target, num_head in ((36, 5), (28, 3), (6, 2), (32, 1), (40, 4)):
        expected = tuple(build_target_layer_ids(num_target, num_head))
        assert default_target_layer_ids(num_target, num_head) == expected
    assert default_target_layer_ids(36, 5) == (1, 9, 17, 25, 33)
    assert _tiny_cfg(target_layer_ids=()).target_layer_ids == (1, 3)


def _target(**changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=D, num_layers=6, num_heads=4, num_kv_heads=2,
                head_dim=16, intermediate_size=128, qk_norm=True)
    return ModelConfig(**{**base, **changes})


@pytest.mark.parametrize("head_changes, target_changes, message", [
    ({}, {"hidden_size": 32}, "hidden size 64 does not match the target's 32"),
    ({}, {"vocab_size": 256}, "vocabulary 128 does not match the target's 256"),
    ({}, {"num_layers": 8}, "built for a 6-layer target, this target has 8 layers"),
    ({"target_layer_ids": (1, 6)}, {}, r"taps target layers \[1, 6\]"),
    ({"mask_token_id": 200}, {}, "mask token 200 is outside"),
])
def test_check_head_fits_errors(head_changes, target_changes, message):
    with pytest.raises(UserError, match=message) as err:
        check_head_fits(_tiny_cfg(**head_changes), _target(**target_changes))
    assert "\n" not in str(err.value)


def test_check_head_fits_accepts_matching_target():
    check_head_fits(_tiny_cfg(), _target())
