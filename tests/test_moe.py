"""Qwen3-MoE targets: parity with transformers' Qwen3MoeForCausalLM, lossless speculative decoding
over a MoE target, tensor-parallel sharding of the experts, the CUDA program, and bad configs.

The tiny random models are built here with transformers' own config class and saved with
`save_pretrained` (transformers 5.x writes one tensor per expert, `mlp.experts.{e}.*_proj.weight`,
and the expert count as `num_local_experts`). References run transformers' eager experts loop
(the default grouped-matmul path has no float64).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetspec_jax import layout
from jetspec_jax.config import ModelConfig
from jetspec_jax.decode import generate, start
from jetspec_jax.errors import UserError
from jetspec_jax.head import HeadConfig, init_head_params
from jetspec_jax.loading import load_hf_dir, load_model
from jetspec_jax.loading.checkpoint import abstract_params
from jetspec_jax.moe import route
from jetspec_jax.step import DecodeConfig
from jetspec_jax.tree import TreeConfig
from test_loading import our_logits  # one causal forward -> (T, V)

TINY_MOE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_experts=8, num_experts_per_tok=2, rope_theta=5000.0, max_position_embeddings=256)
# "sparse": every layer is a MoE layer. "mixed": decoder_sparse_step=2 makes layers 1 and 3 sparse,
# and mlp_only_layers=[3] turns 3 back into a dense MLP, so only layer 1 routes.
LAYOUTS = {"sparse": dict(decoder_sparse_step=1), "mixed": dict(decoder_sparse_step=2, mlp_only_layers=[3])}
RANDOM_IDS = np.random.default_rng(0).integers(0, 160, size=40).tolist()
PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 12, 40], [11]]
MAX_NEW = 20


def hf_model(path, dtype="float32"):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              experts_implementation="eager").eval()
    return model.to(getattr(torch, dtype))


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    """{(layout, norm_topk_prob): HF directory} of tiny random Qwen3-MoE models."""
    import torch
    import transformers

    dirs = {}
    for seed, (name, norm) in enumerate([(n, p) for n in LAYOUTS for p in (False, True)]):
        config = transformers.Qwen3MoeConfig(**TINY_MOE, **LAYOUTS[name], norm_topk_prob=norm,
                                             initializer_range=0.2)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager").float().eval()
        with torch.no_grad():  # HF norms start at 1; random ones catch a mix-up between them
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    p.add_(0.2 * torch.randn_like(p))
        path = tmp_path_factory.mktemp(f"moe-{name}-{norm}")
        model.save_pretrained(path)
        dirs[(name, norm)] = path
    return dirs


def random_head(config: ModelConfig) -> HeadConfig:
    return HeadConfig(hidden_size=config.hidden_size, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=96, vocab_size=config.vocab_size, num_target_layers=config.num_layers,
                      mask_token_id=config.vocab_size - 1, block_size=8, target_layer_ids=(0, 1, 3))


# ----------------------------------------------------------------------------- routing and layout


def test_route_worked_example():
    logits = jnp.log(jnp.asarray([[0.1, 0.5, 0.3, 0.1]]))
    np.testing.assert_allclose(route(logits, 2, False), [[0, 0.5, 0.3, 0]], atol=1e-6)
    np.testing.assert_allclose(route(logits, 2, True), [[0, 0.625, 0.375, 0]], atol=1e-6)


def test_config_defaults_keep_dense_models_and_stay_hashable():
    dense = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                        intermediate_size=64)
    assert not any(dense.is_sparse_layer(i) for i in range(2))
    moe = dense.replace(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=2,
                        mlp_only_layers=[1])
    # As our checkpoints write it (JSON) and read it back: a list becomes the tuple again.
    again = ModelConfig(**json.loads(json.dumps(dataclasses.asdict(moe))))
    assert again == moe and hash(again) == hash(moe) and again.mlp_only_layers == (1,)
    assert [moe.is_sparse_layer(i) for i in range(2)] == [False, False]  # 0: step; 1: mlp_only
    assert [moe.replace(mlp_only_layers=()).is_sparse_layer(i) for i in range(2)] == [False, True]
    params = abstract_params(moe.replace(decoder_sparse_step=1, mlp_only_layers=(0,)))
    assert params["layers_0"]["mlp"]["gate_up_proj"]["kernel"].shape == (32, 2, 64)
    assert params["layers_1"]["mlp"]["experts"]["gate_up_proj"].shape == (4, 32, 2, 16)
    assert params["layers_1"]["mlp"]["experts"]["down_proj"].shape == (4, 16, 32)
    assert params["layers_1"]["mlp"]["router"]["kernel"].shape == (32, 4)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        dense.replace(num_experts=4, num_experts_per_tok=5, moe_intermediate_size=16)


def test_expert_layout_round_trips():
    rng = np.random.default_rng(0)
    gate, up = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    fused = layout.fuse({"l/mlp/experts/gate_proj": gate, "l/mlp/experts/up_proj": up}, 4, 2, 8)
    assert list(fused) == ["l/mlp/experts/gate_up_proj"] and fused["l/mlp/experts/gate_up_proj"].shape == (3, 4, 2, 5)
    back = layout.split(fused, 4, 2, 8)
    np.testing.assert_array_equal(back["l/mlp/experts/gate_proj"], gate)
    np.testing.assert_array_equal(back["l/mlp/experts/up_proj"], up)


# ----------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("norm", [False, True], ids=["raw-topk", "norm-topk"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_logits_match_transformers(moe_dirs, name, norm):
    import torch

    path = moe_dirs[(name, norm)]
    model = load_model(path)
    config = model.config
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (8, 2, 32)
    assert config.norm_topk_prob == norm and config.qk_norm
    hf = hf_model(path, "float64")
    kinds = [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in hf.model.layers]
    assert kinds == [config.is_sparse_layer(i) for i in range(4)]
    assert kinds == ([True] * 4 if name == "sparse" else [False, True, False, False])
    with torch.no_grad():
        ref = hf(torch.tensor([RANDOM_IDS])).logits[0].numpy()
    assert np.abs(ref).max() > 3.0
    ours = our_logits(config, model.params, RANDOM_IDS)
    np.testing.assert_allclose(ours, ref, atol=5e-5, rtol=0)
    # The comparison sees the routing: the other top-k weighting is far off.
    flipped = our_logits(config.replace(norm_topk_prob=not norm), model.params, RANDOM_IDS)
    assert np.abs(flipped - ref).max() > 1e-2


def test_fused_expert_tensors_load_the_same(moe_dirs, tmp_path):
    """The fused 3D expert tensors transformers 5.x holds in memory, if a file stores them that way."""
    from safetensors.numpy import load_file, save_file

    src = moe_dirs[("sparse", True)]
    tensors = load_file(src / "model.safetensors")
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for i in range(4):
        p = f"model.layers.{i}.mlp.experts"
        expert = lambda e, n: tensors[f"{p}.{e}.{n}.weight"]  # noqa: E731
        fused[f"{p}.gate_up_proj"] = np.stack([np.concatenate([expert(e, "gate_proj"), expert(e, "up_proj")])
                                               for e in range(8)])  # (E, 2F, d)
        fused[f"{p}.down_proj"] = np.stack([expert(e, "down_proj") for e in range(8)])  # (E, d, F)
    save_file(fused, tmp_path / "model.safetensors")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    _, want = load_hf_dir(src)
    _, got = load_hf_dir(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.fixture(scope="module")
def ar_run(moe_dirs):
    """ar_run(key) -> (LoadedModel, our AR greedy ids of PROMPTS); one compile per model."""
    runs = {}

    def run(key):
        if key not in runs:
            model = load_model(moe_dirs[key])
            out = generate({"target": model.params}, PROMPTS, DecodeConfig(target=model.config), max_new_tokens=MAX_NEW)
            runs[key] = model, [g.ids for g in out]
        return runs[key]

    return run


def test_greedy_ids_equal_transformers_generate(moe_dirs, ar_run):
    import torch

    key = ("mixed", False)
    _, ours = ar_run(key)
    hf = hf_model(moe_dirs[key])
    for prompt, ids in zip(PROMPTS, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert ids == out[0, len(prompt):].tolist()


# ----------------------------------------------------------------------------- speculative decoding


@pytest.mark.parametrize("key, tree", [
    (("sparse", True), TreeConfig(budget=16, width=4, depth=5)),
    (("mixed", False), TreeConfig(budget=6, width=1, depth=5, kind="chain")),
], ids=["sparse-tree", "mixed-chain"])
def test_speculative_decoding_with_a_random_head_is_lossless(ar_run, key, tree):
    model, ar = ar_run(key)
    head = random_head(model.config)
    params = {"target": model.params, "head": init_head_params(head, jax.random.PRNGKey(1))}
    out = generate(params, PROMPTS, DecodeConfig(target=model.config, head=head, tree=tree), max_new_tokens=MAX_NEW)
    assert [g.ids for g in out] == ar
    assert [sum(g.accept_lengths) for g in out] == [len(r) for r in ar]


def test_deep_acceptance_through_moe_verification_is_lossless(ar_run):
    """An oracle drafter (the true next token at rank 0 or 1 of every depth) makes rounds accept
    deep branches of the tree, so the MoE layers' outputs for many tree nodes at once are used;
    the result stays exactly the AR ids."""
    from jetspec_jax.step import verify_and_commit
    from jetspec_jax.tree import build_tree

    model, ar = ar_run(("sparse", True))
    head = random_head(model.config)
    tree = TreeConfig(budget=24, width=2, depth=5)
    config = DecodeConfig(target=model.config, head=head, tree=tree)
    params = {"target": model.params, "head": init_head_params(head, jax.random.PRNGKey(1))}

    @jax.jit
    def round_(params, state, draft_logits):
        return verify_and_commit(params, state, build_tree(state.root, draft_logits, tree), config)[0]

    rng = np.random.default_rng(0)
    state = start(params, PROMPTS, config, max_new_tokens=MAX_NEW)
    while not bool(jnp.all(state.done)):
        logits = rng.normal(size=(len(PROMPTS), tree.depth, model.config.vocab_size)).astype(np.float32)
        num_new = np.asarray(state.num_new)
        for b, row in enumerate(ar):
            for j in range(tree.depth):
                truth = row[min(num_new[b] + j, len(row) - 1)]
                top = logits[b, j].max()
                # rank 0, or rank 1 just below the best other token
                logits[b, j, truth] = top + 1.0 if rng.random() < 0.7 else top - 1e-3
        state = round_(params, state, jnp.asarray(logits))
    ids = [np.asarray(state.tokens[b, : state.num_new[b]]).tolist() for b in range(len(PROMPTS))]
    assert ids == ar
    accepted = [a for b in range(len(PROMPTS)) for a in np.asarray(state.accept_lengths[b, : state.rounds[b]])]
    assert np.mean(accepted) > 2.5, accepted


# ----------------------------------------------------------------------------- bad input


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw.update(changes)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize("changes, message", [
    (dict(shared_expert_intermediate_size=64), "unsupported MoE option shared_expert_intermediate_size=64"),
    (dict(scoring_func="sigmoid"), "unsupported MoE option scoring_func='sigmoid'"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok=9 must be between 1 and num_experts=8"),
    (dict(num_experts=4), "two expert counts"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step and moe_intermediate_size must be >= 1"),
    (dict(mlp_only_layers=["x"]), "bad MoE field in config.json"),
])
def test_unsupported_moe_config_is_one_line_error(moe_dirs, tmp_path, changes, message):
    path = _copy_with_config(moe_dirs[("sparse", False)], tmp_path / "bad", **changes)
    with pytest.raises(UserError, match=message) as e:
        load_hf_dir(path)
    assert "\n" not in str(e.value)


def test_missing_expert_is_one_line_error(moe_dirs, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = moe_dirs[("sparse", False)]
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    with pytest.raises(UserError, match="layers_2/mlp/experts/up_proj: the checkpoint lacks expert 5"):
        load_hf_dir(tmp_path)


def test_cli_rejects_unsupported_moe_config(moe_dirs, tmp_path):
    path = _copy_with_config(moe_dirs[("sparse", False)], tmp_path / "shared", shared_expert_intermediate_size=64)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jetspec_jax.generate", "--model", str(path), "hi"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: unsupported MoE option shared_expert_intermediate_size=64")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- tensor parallelism

SHARDED = textwrap.dedent("""
    import json, sys
    import jax
    from jetspec_jax.decode import generate
    from jetspec_jax.head import HeadConfig, init_head_params
    from jetspec_jax.loading import load_model
    from jetspec_jax.sharding import make_mesh, param_shardings
    from jetspec_jax.step import DecodeConfig
    from jetspec_jax.tree import TreeConfig

    prompts, max_new = json.loads(sys.argv[2]), int(sys.argv[3])
    model = load_model(sys.argv[1])
    c = model.config
    head = HeadConfig(hidden_size=c.hidden_size, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=96, vocab_size=c.vocab_size, num_target_layers=c.num_layers,
                      mask_token_id=c.vocab_size - 1, block_size=8, target_layer_ids=(0, 1, 3))
    params = {"target": model.params, "head": init_head_params(head, jax.random.PRNGKey(1))}
    configs = {"ar": DecodeConfig(target=c),
               "tree": DecodeConfig(target=c, head=head, tree=TreeConfig(budget=16, width=4, depth=5))}
    out = {}
    for mode, spec in (("ar", None), ("ar", "tp=4"), ("tree", "tp=4"), ("tree", "dp=2,tp=2")):
        p = params if mode == "tree" else {"target": params["target"]}
        out[f"{mode} {spec}"] = [g.ids for g in generate(p, prompts, configs[mode], max_new_tokens=max_new, mesh=spec)]
    shardings = param_shardings(params, configs["tree"], make_mesh("tp=4"))
    mlp = shardings["target"]["layers_1"]["mlp"]
    out["specs"] = {name: [a for a in s.spec] for name, s in
                    [("gate_up", mlp["experts"]["gate_up_proj"]), ("down", mlp["experts"]["down_proj"]),
                     ("router", mlp["router"]["kernel"])]}
    print(json.dumps(out))
""")


def test_tensor_parallel_experts_equal_one_device(moe_dirs, tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.pop("JETSPEC_COORDINATOR", None)
    proc = subprocess.run([sys.executable, str(script), str(moe_dirs[("mixed", False)]), json.dumps(PROMPTS),
                           str(MAX_NEW)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    reference = out["ar None"]  # one device, AR (the tree on one device equals it: tests above)
    assert all(len(r) == MAX_NEW for r in reference)
    for run in ("ar tp=4", "tree tp=4", "tree dp=2,tp=2"):
        assert out[run] == reference, run
    # Each expert's width is split over tp (trailing unsharded axes may be left out of a spec).
    pad = lambda spec, n: spec + [None] * (n - len(spec))  # noqa: E731
    assert pad(out["specs"]["gate_up"], 4) == [None, None, None, "tp"]  # (E, d, 2, F)
    assert pad(out["specs"]["down"], 3) == [None, "tp", None]  # (E, F, d)
    assert pad(out["specs"]["router"], 2) == [None, None]


# ----------------------------------------------------------------------------- the CUDA program

# Qwen3-30B-A3B (HF config.json of Qwen/Qwen3-30B-A3B) cut to 4 of its 48 layers, so that it lowers
# in seconds; every layer is sparse as in the real model.
QWEN3_30B_A3B_4L = ModelConfig(vocab_size=151936, hidden_size=2048, num_layers=4, num_heads=32, num_kv_heads=4,
                               head_dim=128, intermediate_size=6144, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                               qk_norm=True, max_position_embeddings=40960, dtype="bfloat16", num_experts=128,
                               num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True)


def test_decode_loop_with_a_moe_target_lowers_for_cuda():
    from jetspec_jax.lowering import inspect_module, lower_decode

    target = QWEN3_30B_A3B_4L
    head = HeadConfig(hidden_size=2048, num_layers=2, num_heads=32, num_kv_heads=4, head_dim=128,
                      intermediate_size=6144, vocab_size=target.vocab_size, num_target_layers=4,
                      mask_token_id=151669, block_size=16, rope_theta=1_000_000.0, dtype="bfloat16")
    config = DecodeConfig(target=target, head=head, tree=TreeConfig(budget=64, width=8, depth=15))
    module = lower_decode(config, batch=1, capacity=4096)
    report = inspect_module(module)
    assert report.host_callbacks == 0
    assert report.loop_body_conditionals == 0 and report.conditionals == 0
    assert report.whiles == 2 and report.loop_body_whiles == 1  # the decoding loop; the tree's scan
    # The attention kernel runs in every target and head layer; the experts are plain matmuls.
    assert sum(c.calls for c in report.triton) == target.num_layers + head.num_layers
    text = str(module)
    # All 128 experts run on the 64 tree nodes: the (N, E, 2, F) product of the dense dispatch.
    assert "tensor<64x128x2x768xbf16>" in text
