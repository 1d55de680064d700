"""Sharded decoding (jax.sharding over a dp x tp mesh) emits exactly the single-device ids.

The test process has one CPU device, so multi-device runs happen in subprocesses with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`; a two-process run joins through
`jax.distributed` on localhost (CPU collectives: gloo, jax's default).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jetspec_jax.config import ModelConfig
from jetspec_jax.errors import UserError
from jetspec_jax.head import HeadConfig, init_head_params
from jetspec_jax.model import init_params
from jetspec_jax.sharding import check_mesh_fits, param_axes, param_shardings, parse_mesh
from jetspec_jax.step import DecodeConfig
from jetspec_jax.tree import TreeConfig

# Shared by this process and the subprocess scripts (which exec this block).
MODELS = textwrap.dedent("""
    import jax
    from jetspec_jax.config import ModelConfig
    from jetspec_jax.head import HeadConfig, init_head_params
    from jetspec_jax.model import init_params
    from jetspec_jax.step import DecodeConfig
    from jetspec_jax.tree import TreeConfig

    def tiny(heads, kv_heads, ffn):
        target = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=heads,
                             num_kv_heads=kv_heads, head_dim=8, intermediate_size=ffn, qk_norm=True)
        head = HeadConfig(hidden_size=32, num_layers=1, num_heads=heads, num_kv_heads=kv_heads,
                          head_dim=8, intermediate_size=ffn, vocab_size=64, num_target_layers=2,
                          mask_token_id=63, block_size=6, target_layer_ids=(0, 1))
        config = DecodeConfig(target=target, head=head, tree=TreeConfig(budget=9, width=3, depth=4))
        params = {"target": init_params(target, jax.random.PRNGKey(0)),
                  "head": init_head_params(head, jax.random.PRNGKey(1))}
        return config, params

    PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 12, 40], [11]]  # 3 rows: dp=2 pads the batch to 4
    MAX_NEW = 16
""")

MULTI_DEVICE = MODELS + textwrap.dedent("""
    import json
    import jax.numpy as jnp
    from jetspec_jax.decode import decode, generate, start
    from jetspec_jax.runner import Runner
    from jetspec_jax.sharding import make_mesh, shard_params, state_shardings

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _s, **_: compiles.append(event) if event.endswith("backend_compile_duration") else None)

    def ids(params, config, prompts=PROMPTS, mesh=None):
        return [g.ids for g in generate(params, prompts, config, max_new_tokens=MAX_NEW, mesh=mesh)]

    out = {}
    config, params = tiny(4, 2, 64)
    out["reference"] = ids(params, config)
    for spec in ["tp=2", "tp=4", "dp=2", "dp=2,tp=2"]:
        out[spec] = ids(params, config, mesh=spec)

    # The layout every round keeps, and no compilation for a new batch in the same bucket.
    mesh = make_mesh("dp=2,tp=2")
    sharded = shard_params(params, config, mesh)
    state = start(sharded, PROMPTS, config, max_new_tokens=MAX_NEW, mesh=mesh)
    state = decode(sharded, state, jnp.int32(3), config=config, mesh=mesh)
    want = state_shardings(state, config, mesh)
    out["layout_kept"] = all(jax.tree.leaves(jax.tree.map(
        lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), state, want)))
    spec = state.target_cache.k[0].sharding.spec
    out["cache_spec"] = list(spec) + [None] * (4 - len(spec))
    other = [[60, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2], [1, 2], [33, 34, 35]]
    before = len(compiles)
    out["other_sharded"] = ids(sharded, config, other, mesh=mesh)
    out["compiles_after_warm_up"] = len(compiles) - before
    out["compiles_before"] = before  # the counter works: warm-up compiled
    out["other_reference"] = ids(params, config, other)
    runner = Runner(params, config, mesh="dp=2")
    out["runner_dp2"] = [r.ids for r in runner.run(PROMPTS, max_new_tokens=MAX_NEW)]

    # tp=3: 6 query / 3 KV heads split, the 64-token vocabulary (not a multiple of 3) replicated.
    config3, params3 = tiny(6, 3, 48)
    out["reference_tp3"] = ids(params3, config3)
    out["tp=3"] = ids(params3, config3, mesh="tp=3")
    print(json.dumps(out))
""")


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("JETSPEC_COORDINATOR", None)
    return env


def _run_script(tmp_path, name, source, devices, timeout=600) -> dict:
    script = tmp_path / name
    script.write_text(source)
    proc = subprocess.run([sys.executable, str(script)], env=_env(devices), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def multi_device(tmp_path_factory):
    return _run_script(tmp_path_factory.mktemp("sharding"), "multi_device.py", MULTI_DEVICE, 8)


def _tiny(heads, kv_heads, ffn):
    scope = {}
    exec(MODELS, scope)
    return scope["tiny"](heads, kv_heads, ffn), scope


@pytest.mark.parametrize("spec", ["tp=2", "tp=4", "dp=2", "dp=2,tp=2"])
def test_sharded_greedy_ids_equal_single_device(multi_device, spec):
    assert multi_device[spec] == multi_device["reference"]
    assert all(len(r) == 16 for r in multi_device["reference"])


def test_tp3_splits_three_kv_heads(multi_device):
    assert multi_device["tp=3"] == multi_device["reference_tp3"]


def test_layout_is_kept_and_nothing_recompiles(multi_device):
    assert multi_device["layout_kept"]
    assert multi_device["cache_spec"] == ["dp", "tp", None, None]  # (B, Hkv, S, Dh)
    assert multi_device["compiles_after_warm_up"] == 0 and multi_device["compiles_before"] > 0
    assert multi_device["other_sharded"] == multi_device["other_reference"]


def test_runner_drops_padding_rows(multi_device):
    assert multi_device["runner_dp2"] == multi_device["reference"]


def test_parse_mesh():
    assert parse_mesh("dp=2,tp=4") == {"dp": 2, "tp": 4}
    assert parse_mesh(" tp = 3 ") == {"dp": 1, "tp": 3}
    for bad, why in [("dp=2,tp=x", "whole number"), ("pp=2", "axes: dp, tp"), ("dp=0", ">= 1"),
                     ("dp=2,dp=2", "twice"), ("", "axes"), ("dp2", "axes")]:
        with pytest.raises(UserError, match=why):
            parse_mesh(bad)


def test_every_parameter_has_a_rule_and_unknown_ones_raise():
    (config, params), _ = _tiny(4, 2, 64)
    mesh = jax.make_mesh((1, 1), ("dp", "tp"), (jax.sharding.AxisType.Auto,) * 2)
    shardings = param_shardings(params, config, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(params)
    # Untied LM head, qkv biases and the head's o_proj bias all have rules too.
    biased = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                         head_dim=8, intermediate_size=64, qkv_bias=True, tie_embeddings=True)
    head = HeadConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=64, vocab_size=64, num_target_layers=1, mask_token_id=63,
                      block_size=4, qkv_bias=True)
    params = jax.eval_shape(lambda: {"target": init_params(biased, jax.random.PRNGKey(0)),
                                     "head": init_head_params(head, jax.random.PRNGKey(1))})
    chain = TreeConfig(3, 1, 2, kind="chain")
    param_shardings(params, DecodeConfig(target=biased, head=head, tree=chain), mesh)
    path = tuple(jax.tree_util.DictKey(k) for k in ("layers_0", "adapter", "kernel"))
    with pytest.raises(ValueError, match="no sharding rule for parameter layers_0/adapter/kernel"):
        param_axes(path, 2)


def test_mesh_that_cannot_fit_is_one_line_error():
    (config, _), _ = _tiny(4, 2, 64)

    class FakeMesh:  # only the axis sizes matter
        shape = {"dp": 1, "tp": 3}

    with pytest.raises(UserError, match="tp=3 does not divide the target's 4 attention heads") as e:
        check_mesh_fits(config.target, config.head, FakeMesh())
    assert "\n" not in str(e.value)
    FakeMesh.shape = {"dp": 1, "tp": 4}
    check_mesh_fits(config.target, config.head, FakeMesh())  # 2 KV heads: replicated, allowed


@pytest.mark.parametrize("mesh, message", [
    ("dp=2,tp=x", "error: bad --mesh 'dp=2,tp=x': tp must be a whole number"),
    ("dp=4,tp=4", "error: mesh dp=4,tp=4 needs 16 devices; 8 available across 1 process(es)"),
])
def test_cli_bad_mesh_is_one_line_error(mesh, message):
    proc = subprocess.run([sys.executable, "-m", "jetspec_jax.generate", "hi", "--mesh", mesh],
                          env=_env(8), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def _write_hf_dir(path, config, params):
    """A Hugging Face directory (config.json + model.safetensors) holding our params."""
    from safetensors.numpy import save_file

    from jetspec_jax import layout
    from jetspec_jax.loading.hf import _GLOBAL_TENSORS, _LAYER_TENSORS

    names = {ours: hf for hf, ours in _GLOBAL_TENSORS.items()}
    for i in range(config.num_layers):
        names.update({f"layers_{i}/{ours}": f"model.layers.{i}.{hf}" for hf, ours in _LAYER_TENSORS.items()})
    flat = {"/".join(k.key for k in key_path): np.asarray(value)
            for key_path, value in jax.tree_util.tree_flatten_with_path(params)[0]}
    flat = layout.split(flat, config.num_heads, config.num_kv_heads, config.head_dim)  # HF: one per projection
    tensors = {names[ours]: np.ascontiguousarray(w.T if ours.endswith("/kernel") else w) for ours, w in flat.items()}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size, "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "eos_token_id": 63}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    """Two jax.distributed processes x 2 CPU devices, mesh dp=2,tp=2, through the CLI (flags for
    process 0, environment variables for process 1) == the single-device CLI."""
    from jetspec_jax.cli import main
    from jetspec_jax.loading.head_io import save_head_dir

    (config, params), scope = _tiny(4, 2, 64)
    model_dir, head_dir = tmp_path / "model", tmp_path / "head"
    model_dir.mkdir()
    _write_hf_dir(model_dir, config.target, params["target"])
    save_head_dir(head_dir, config.head, params["head"])
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in scope["PROMPTS"]))
    common = ["--model", str(model_dir), "--draft", str(head_dir), "--mode", "tree", "--budget", "9",
              "--width", "3", "--depth", "4", "--max-new-tokens", "16", "--batch-size", "3",
              "--input", str(src)]
    assert main([*common, "--output", str(tmp_path / "single.jsonl")]) == 0
    single = [json.loads(line)["ids"] for line in (tmp_path / "single.jsonl").read_text().splitlines()]

    coordinator = f"localhost:{_free_port()}"
    cmd = [sys.executable, "-m", "jetspec_jax.generate", *common, "--mesh", "dp=2,tp=2",
           "--output", str(tmp_path / "multi.jsonl")]
    flags = ["--coordinator", coordinator, "--num-processes", "2", "--process-id", "0"]
    procs = [subprocess.Popen([*cmd, *flags],
                              env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
             subprocess.Popen(cmd, env={**_env(2), "JETSPEC_COORDINATOR": coordinator,
                                        "JETSPEC_NUM_PROCESSES": "2", "JETSPEC_PROCESS_ID": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    multi = [json.loads(line)["ids"] for line in (tmp_path / "multi.jsonl").read_text().splitlines()]
    assert multi == single
    assert len(single) == 3 and all(single)


SMOLLM2_TP3 = textwrap.dedent("""
    import json
    from jetspec_jax.cli import default_head_path
    from jetspec_jax.decode import generate
    from jetspec_jax.loading import load_model
    from jetspec_jax.loading.head_io import load_head_dir
    from jetspec_jax.step import DecodeConfig
    from jetspec_jax.tree import TreeConfig

    model = load_model("smollm2-135m")
    head, head_params = load_head_dir(default_head_path("smollm2-135m"))  # the shipped head
    params = {"target": model.params, "head": head_params}
    config = DecodeConfig(target=model.config, head=head, tree=TreeConfig(budget=16, width=4, depth=15))
    prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}]),
               [1, 2, 3, 4, 5]]
    run = lambda mesh: [g.ids for g in generate(params, prompts, config, max_new_tokens=24, mesh=mesh)]
    print(json.dumps({"reference": run(None), "tp=3": run("tp=3")}))
""")


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_tp3_equals_single_device(smollm2_gguf, tmp_path):
    """SmolLM2-135M (9 query / 3 KV heads) split over tp=3, with its shipped draft head."""
    out = _run_script(tmp_path, "smollm2_tp3.py", SMOLLM2_TP3, 3, timeout=900)
    assert out["tp=3"] == out["reference"]
