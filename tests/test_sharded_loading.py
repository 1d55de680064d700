"""Loading an HF directory straight into a mesh (loading/sharded.py): each device reads its shard.

Multi-device runs happen in subprocesses with 8 forced host devices (as in test_sharding.py).
The models are tiny but wide (hidden 512, ffn 2048, vocab 8192, 8 query / 4 KV heads), so tp=8
replicates the qkv kernel (4 KV heads) and dp=2,tp=4 splits it; vocabulary, MLP width and heads
split on both. Checked: the sharded load is bitwise `shard_params(load_hf_dir(...))` leaf by leaf
(values, dtype, sharding), greedy ids match one device, every callback reads exactly its shard's
bytes and every file byte is read once, and peak RSS while loading stays well below the full-copy
path's.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

WIDE = dict(vocab_size=8192, hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
            intermediate_size=2048, head_dim=64)
MESHES = ["tp=8", "dp=2,tp=4"]


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.pop("JETSPEC_COORDINATOR", None)
    return env


def _run(tmp_path, name, source, *args, timeout=300) -> dict:
    script = tmp_path / name
    script.write_text(source)
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _moe_dir(path):
    """A tiny Qwen3-MoE (layer 0 dense, layer 1 sparse) with heads and widths that tp=8 divides."""
    import torch
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
        head_dim=8, intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=2, max_position_embeddings=256, initializer_range=0.2)
    torch.manual_seed(7)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def _fused_moe_dir(src, path):
    """The same MoE with the fused 3D expert tensors (E, 2F, d) / (E, d, F) (see hf.py)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    p = "model.layers.1.mlp.experts"
    expert = lambda e, n: tensors[f"{p}.{e}.{n}.weight"]  # noqa: E731
    fused[f"{p}.gate_up_proj"] = np.stack([np.concatenate([expert(e, "gate_proj"), expert(e, "up_proj")])
                                           for e in range(4)])
    fused[f"{p}.down_proj"] = np.stack([expert(e, "down_proj") for e in range(4)])
    path.mkdir()
    save_file(fused, path / "model.safetensors")
    shutil.copy(src / "config.json", path / "config.json")
    return path


@pytest.fixture(scope="module")
def wide_dirs(make_tiny_hf, tmp_path_factory):
    """{name: HF dir}: Qwen3 in 2 safetensors shards + index, Qwen2 (q/k/v biases), Llama with
    tied embeddings, and Qwen3-MoE in both expert layouts."""
    dirs = {"qwen3": make_tiny_hf("qwen3", max_shard_size="40MB", **WIDE),
            "qwen2": make_tiny_hf("qwen2", **WIDE),
            "llama": make_tiny_hf("llama", **WIDE),
            "moe": _moe_dir(tmp_path_factory.mktemp("wide-moe"))}
    dirs["moe_fused"] = _fused_moe_dir(dirs["moe"], tmp_path_factory.mktemp("wide-moe-fused") / "m")
    assert len(json.loads((dirs["qwen3"] / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    return dirs


PARITY = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import jax
    import numpy as np
    from safetensors import safe_open
    from jetspec_jax import layout
    from jetspec_jax.decode import generate
    from jetspec_jax.loading import load_model, sharded
    from jetspec_jax.loading.hf import _shard_files, load_hf_dir
    from jetspec_jax.runner import Runner
    from jetspec_jax.sharding import make_mesh, shard_params
    from jetspec_jax.step import DecodeConfig

    dirs, meshes = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    PROMPTS, MAX_NEW = [[5, 9, 2], [7, 1, 3, 3, 8, 12, 40], [11]], 8

    # Bytes accounting: every file read goes through sharded._read_slice, every device's shard
    # through sharded._leaf_shard (called once per distinct index of a leaf).
    log = {"reads": [], "calls": []}
    real_read, real_shard = sharded._read_slice, sharded._leaf_shard

    def counted_read(handle, name, index):
        x = real_read(handle, name, index)
        log["reads"].append((name, x.nbytes, x.size))
        return x

    def counted_shard(name, sources, files, index, config, dtype):
        start = len(log["reads"])
        x = real_shard(name, sources, files, index, config, dtype)
        log["calls"].append((name, tuple((s.start, s.stop) for s in index), x.shape,
                             sum(n for _, n, _ in log["reads"][start:]), x.size))
        return x

    sharded._read_slice, sharded._leaf_shard = counted_read, counted_shard

    def file_bytes(path, tied):
        total = 0
        for file in _shard_files(Path(path)):
            with safe_open(str(file), framework="numpy") as f:
                for name in f.keys():
                    if not (name == "lm_head.weight" and tied):
                        total += f.get_slice(name)[:].nbytes
        return total

    out = {}
    for key, path in dirs.items():
        for spec in meshes:
            for dtype in (("float32", "bfloat16") if key == "qwen3" else ("float32",)):
                mesh = make_mesh(spec)
                log["reads"].clear(); log["calls"].clear()
                config, got = sharded.load_hf_dir_sharded(path, dtype, mesh)
                reads, calls = list(log["reads"]), list(log["calls"])
                _, full = load_hf_dir(path, dtype)
                dc = DecodeConfig(target=config)
                want = shard_params({"target": full}, dc, mesh)["target"]
                g, w = layout.flatten(got), layout.flatten(want)
                r = {"same_keys": sorted(g) == sorted(w), "mismatch": [], "bad_calls": [], "whole_split": [],
                     "missing_shards": []}
                for name in w:
                    a, b = g[name], w[name]
                    if not (a.sharding == b.sharding and a.dtype == b.dtype and a.shape == b.shape
                            and np.array_equal(np.asarray(a), np.asarray(b))):
                        r["mismatch"].append(name)
                    want_idx = {tuple((s.start or 0, n if s.stop is None else s.stop) for s, n in zip(i, a.shape))
                                for i in a.sharding.addressable_devices_indices_map(a.shape).values()}
                    got_idx = {c[1] for c in calls if c[0] == name}
                    if got_idx != want_idx:
                        r["missing_shards"].append(name)
                    split = not a.sharding.is_fully_replicated
                    for n, _, shape, nread, size in (c for c in calls if c[0] == name):
                        if nread != size * 4:  # the files are float32: exactly this shard's bytes
                            r["bad_calls"].append([name, nread, size * 4])
                        if split and tuple(shape) == a.shape:
                            r["whole_split"].append(name)
                # no single file read of a split leaf as large as the leaf
                split_sizes = {n: g[n].size for n in g if not g[n].sharding.is_fully_replicated}
                r["largest_split_read_fraction"] = max(
                    (c[3] / (split_sizes[c[0]] * 4) for c in calls if c[0] in split_sizes), default=0)
                r["bytes_read"] = sum(n for _, n, _ in reads)
                r["file_bytes"] = file_bytes(path, config.tie_embeddings)
                r["n_reads"] = len(reads)
                r["split_leaves"] = len(split_sizes)
                r["replaced"] = sum(x is not y for x, y in zip(
                    jax.tree.leaves(shard_params({"target": got}, dc, mesh)["target"]), jax.tree.leaves(got)))
                out[f"{key} {spec} {dtype}"] = r

    # load_model(mesh=...) places the params; Runner keeps them as they are.
    mesh = make_mesh("dp=2,tp=4")
    model = load_model(dirs["qwen3"], mesh=mesh)
    runner = Runner({"target": model.params}, DecodeConfig(target=model.config), mesh=mesh)
    out["runner_replaced"] = sum(x is not y for x, y in zip(jax.tree.leaves(runner.params["target"]),
                                                              jax.tree.leaves(model.params)))
    out["load_model_sharding"] = str(model.params["lm_head"]["kernel"].sharding.spec)

    # Greedy ids: sharded load on the mesh == the full load on one device.
    ids = {}
    for key, spec in (("qwen3", "dp=2,tp=4"), ("llama", "tp=8"), ("moe_fused", "tp=8")):
        config, single = load_hf_dir(dirs[key])
        dc = DecodeConfig(target=config)
        _, placed = sharded.load_hf_dir_sharded(dirs[key], "float32", make_mesh(spec))
        ref = [r.ids for r in generate({"target": single}, PROMPTS, dc, max_new_tokens=MAX_NEW)]
        got = [r.ids for r in generate({"target": placed}, PROMPTS, dc, max_new_tokens=MAX_NEW, mesh=make_mesh(spec))]
        ids[f"{key} {spec}"] = [ref, got]
    out["ids"] = ids
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def parity(wide_dirs, tmp_path_factory):
    dirs = {k: str(v) for k, v in wide_dirs.items()}
    return _run(tmp_path_factory.mktemp("sharded-loading"), "parity.py", PARITY, json.dumps(dirs), json.dumps(MESHES))


CASES = [f"{k} {m} float32" for k in ("qwen3", "qwen2", "llama", "moe", "moe_fused") for m in MESHES] + \
        [f"qwen3 {m} bfloat16" for m in MESHES]


@pytest.mark.parametrize("case", CASES)
def test_sharded_load_equals_shard_params_of_full_load(parity, case):
    r = parity[case]
    assert r["same_keys"] and r["mismatch"] == []  # bitwise values, dtype and sharding, every leaf
    assert r["replaced"] == 0  # shard_params leaves already-placed arrays as they are


@pytest.mark.parametrize("case", CASES)
def test_each_device_reads_only_its_shard(parity, case):
    r = parity[case]
    print(f"{case}: read {r['bytes_read']} of {r['file_bytes']} file bytes in {r['n_reads']} slice reads; "
          f"{r['split_leaves']} split leaves, largest read {r['largest_split_read_fraction']:.3f} of its leaf")
    assert r["missing_shards"] == []  # one callback per distinct device index, nothing else
    assert r["bad_calls"] == []  # each callback read exactly its shard's bytes
    assert r["whole_split"] == [] and r["split_leaves"] > 0  # a split leaf never came back whole
    assert r["largest_split_read_fraction"] <= 0.5
    # Replicas share one read, so every byte of the files is read exactly once per process.
    assert r["bytes_read"] == r["file_bytes"]


def test_load_model_with_mesh_and_runner_keep_placement(parity):
    assert parity["runner_replaced"] == 0
    assert "tp" in parity["load_model_sharding"]


def test_greedy_ids_match_single_device(parity):
    for key, (ref, got) in parity["ids"].items():
        assert got == ref and all(ref), key


def test_shard_reads_are_a_fraction_of_the_tensor(parity):
    """tp=8 splits the embedding, MLP and o_proj 8 ways: their shards are 1/8 of the leaf."""
    assert parity["qwen3 tp=8 float32"]["largest_split_read_fraction"] <= 1 / 8 + 1e-9


RSS = textwrap.dedent("""
    import json, resource, sys
    import jax
    import numpy as np
    from jetspec_jax.loading.hf import load_hf_dir
    from jetspec_jax.loading.sharded import load_hf_dir_sharded
    from jetspec_jax.sharding import make_mesh, shard_params
    from jetspec_jax.step import DecodeConfig

    def peak_kb():  # this process's own high-water RSS (ru_maxrss starts at the forking parent's)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    path, mode = sys.argv[1], sys.argv[2]
    mesh = make_mesh("tp=8")
    jax.block_until_ready(jax.device_put(np.zeros(8, np.float32)))  # backend up before measuring
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
    except OSError:
        pass
    before, before_ru = peak_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "sharded":
        config, params = load_hf_dir_sharded(path, "float32", mesh)
    else:
        config, full = load_hf_dir(path, "float32")
        params = shard_params({"target": full}, DecodeConfig(target=config), mesh)["target"]
        del full
    jax.block_until_ready(params)
    after, after_ru = peak_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    size = sum(x.nbytes for x in jax.tree.leaves(params))
    print(json.dumps({"growth_mb": (after - before) / 1024, "ru_maxrss_growth_mb": (after_ru - before_ru) / 1024,
                      "params_mb": size / 2**20}))
""")


def _write_llama(path, layers=4, d=1024, ffn=4096, vocab=8192, heads=8):
    """A float32 Llama directory written with numpy (~336 MB), no transformers needed."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    w = lambda *shape: rng.standard_normal(shape, dtype=np.float32) * 0.02  # noqa: E731
    path.mkdir()
    for part in range(2):  # two files and an index, half the layers each
        tensors = {}
        if part == 0:
            tensors["model.embed_tokens.weight"] = w(vocab, d)
        else:
            tensors["lm_head.weight"], tensors["model.norm.weight"] = w(vocab, d), np.ones(d, np.float32)
        for i in range(part * layers // 2, (part + 1) * layers // 2):
            p = f"model.layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[p + f"self_attn.{name}.weight"] = w(d, d)
            tensors[p + "mlp.gate_proj.weight"], tensors[p + "mlp.up_proj.weight"] = w(ffn, d), w(ffn, d)
            tensors[p + "mlp.down_proj.weight"] = w(d, ffn)
            tensors[p + "input_layernorm.weight"] = np.ones(d, np.float32)
            tensors[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
        save_file(tensors, path / f"model-{part}.safetensors")
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "x": "model-0.safetensors", "y": "model-1.safetensors"}}))
    (path / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=ffn, tie_word_embeddings=False, max_position_embeddings=256)))
    return path


def test_peak_rss_while_loading(tmp_path):
    """Peak RSS growth across the load, in fresh processes: the sharded load holds the devices'
    buffers (one copy of the model, tp splits everything large) plus one leaf in flight; the full
    path holds a host copy, a device-0 copy and the placed shards.

    Measured with VmHWM (reset through /proc/self/clear_refs), not ru_maxrss: Linux carries
    ru_maxrss over exec from the forking process, so in a pytest run that has grown (the model
    fixtures) it starts above both loads' peaks and reads 0 growth."""
    path = _write_llama(tmp_path / "llama")
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status (Linux) for the process's own peak RSS")
    sharded = _run(tmp_path, "rss.py", RSS, path, "sharded")
    full = _run(tmp_path, "rss.py", RSS, path, "full")
    print(f"peak RSS growth: sharded {sharded['growth_mb']:.0f} MB, full {full['growth_mb']:.0f} MB, "
          f"params {sharded['params_mb']:.0f} MB (ru_maxrss growth: sharded "
          f"{sharded['ru_maxrss_growth_mb']:.0f} MB, full {full['ru_maxrss_growth_mb']:.0f} MB)")
    # Measured on the 2-core CPU box: sharded ~400-460 MB, full ~920-960 MB for 320 MB of params
    # (the sharded excess: one leaf in flight, its mapped file pages, allocator slack).
    assert sharded["params_mb"] > 300
    assert full["growth_mb"] > 2.3 * sharded["params_mb"]  # the full path does hold extra copies
    assert sharded["growth_mb"] < 0.65 * full["growth_mb"]
    assert sharded["growth_mb"] < 1.75 * sharded["params_mb"]


def test_one_device_mesh_and_user_errors(tiny_hf_models, tmp_path):
    """In this process (one device): the same params as load_hf_dir, and the same one-line
    UserErrors for a directory that does not fit the config."""
    import jax
    from safetensors.numpy import load_file, save_file

    from jetspec_jax.errors import UserError
    from jetspec_jax.loading.hf import load_hf_dir
    from jetspec_jax.loading.sharded import load_hf_dir_sharded

    src = tiny_hf_models["qwen3"]
    _, want = load_hf_dir(src, "bfloat16")
    _, got = load_hf_dir_sharded(src, "bfloat16", "tp=1")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
    with pytest.raises(ValueError, match="needs a mesh"):
        load_hf_dir_sharded(src, "float32", None)
    with pytest.raises(UserError, match="model directory not found"):
        load_hf_dir_sharded(tmp_path / "nope", "float32", "tp=1")
    tensors = load_file(src / "model.safetensors")
    for name, change, message in [
        ("model.layers.1.mlp.up_proj.weight", None, "missing parameter layers_1/mlp/up_proj/kernel"),
        ("model.layers.0.self_attn.k_proj.weight", "shape", "parameter layers_0/attn/k_proj/kernel has shape"),
        ("model.layers.0.extra.weight", "add", "unexpected tensor 'model.layers.0.extra.weight'"),
    ]:
        bad = tmp_path / name
        bad.mkdir()
        shutil.copy(src / "config.json", bad / "config.json")
        edited = dict(tensors)
        if change is None:
            del edited[name]
        elif change == "shape":
            edited[name] = edited[name][:-1]
        else:
            edited[name] = np.zeros(3, np.float32)
        save_file(edited, bad / "model.safetensors")
        with pytest.raises(UserError, match=message) as e:
            load_hf_dir_sharded(bad, "float32", "tp=1")
        assert "\n" not in str(e.value)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    shutil.copy(src / "config.json", truncated / "config.json")
    data = (src / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_hf_dir_sharded(truncated, "float32", "tp=1")
