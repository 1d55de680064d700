"""The GPU path, checked without a GPU: prefill and the decoding loop at Qwen3-8B shapes (bf16,
the published JetSpec Qwen3-8B head's layout read from its config.json: 5 causal layers tapping
5 target layers, block size 16; an 8192-slot cache) lowered for CUDA from abstract parameters.

What a lowered program must show (jetspec_jax/lowering.py reads it):
- the Pallas kernel as Triton calls, one per attention layer that runs: 36 verify layers and 5
  head layers per round;
- at B = 1, at least 264 programs per launch (2 per SM of a 132-SM H100/H200);
- no host callback anywhere and no conditional in the loop body (each one on a GPU waits on the
  device for its predicate); the loop body's only inner loop is the tree builder's scan;
- with sampling on, no sort of the 151936-token vocabulary (top-k / top-p by bisection);
- under a mesh, each device's Triton call sees its own batch rows and KV heads (shard_map), never
  the global arrays.
The single-device and mesh programs are lowered in subprocesses with 8 forced host devices where
a mesh is needed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from jetspec_jax.kernels.tree_attn.pallas_kernel import MIN_PROGRAMS, default_block_sizes
from jetspec_jax.loading.head_io import head_config_from_hf
from jetspec_jax.lowering import (QWEN3_8B, QWEN3_8B_HEAD, QWEN3_8B_HEAD_HF, inspect_module, lower_decode,
                                  lower_prefill, qwen3_8b_config)

CAPACITY = 8192
LAYERS, HEAD_LAYERS, KV_HEADS, HEAD_DIM = 36, 5, 8, 128


def test_qwen3_8b_shapes():
    # HF config.json of Qwen/Qwen3-8B; the head read from the published JetSpec Qwen3-8B head's
    # config.json by the loader's own parser (tests/test_published_head.py: its sources).
    assert (QWEN3_8B.num_layers, QWEN3_8B.hidden_size, QWEN3_8B.num_heads, QWEN3_8B.num_kv_heads) == (36, 4096, 32, 8)
    assert (QWEN3_8B.head_dim, QWEN3_8B.intermediate_size, QWEN3_8B.vocab_size) == (128, 12288, 151936)
    assert QWEN3_8B_HEAD == head_config_from_hf(QWEN3_8B_HEAD_HF, dtype="bfloat16")
    assert QWEN3_8B_HEAD.num_layers == HEAD_LAYERS and QWEN3_8B_HEAD.target_layer_ids == (1, 9, 17, 25, 33)
    assert (QWEN3_8B_HEAD.block_size, QWEN3_8B_HEAD.mask_token_id, QWEN3_8B_HEAD.causal) == (16, 151669, True)
    # Every program below is built from that head (the mesh ones in subprocesses, through the same call).
    assert qwen3_8b_config(16).head == QWEN3_8B_HEAD


def test_default_tiling_fills_the_gpu_at_batch_1():
    # The docstring's worked examples: 64 rows -> 8 programs unsplit -> 33 splits; 1024 rows ->
    # 128 programs -> 3 splits.
    assert default_block_sizes(1, 16, 32, 8, 8192).kv_splits == 33
    assert default_block_sizes(1, 256, 32, 8, 8192).kv_splits == 3
    # Never more splits than the cache has 64-slot blocks, never fewer than one.
    assert default_block_sizes(1, 1, 4, 1, 100).kv_splits == 2
    assert default_block_sizes(64, 256, 32, 8, 8192).kv_splits == 1


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("budget", [16, 64, 256])
def test_decode_loop_lowers_for_cuda_with_the_kernel(batch, budget):
    report = inspect_module(lower_decode(qwen3_8b_config(budget), batch=batch, capacity=CAPACITY))
    assert report.host_callbacks == 0
    assert report.loop_body_conditionals == 0 and report.conditionals == 0
    assert report.whiles == 2 and report.loop_body_whiles == 1  # the decoding loop; the tree's scan
    # Verify: q (B, Hkv, rows, D) with budget x 4 query heads per KV head; the head's block: 16 rows.
    launches = {c.operands[2][2]: c for c in report.triton}
    calls = {rows: c.calls for rows, c in launches.items()}
    if budget == 16:  # the head's block has as many rows as the tree: one kernel for both
        assert calls == {16 * 4: LAYERS + HEAD_LAYERS}
    else:
        assert calls == {16 * 4: HEAD_LAYERS, budget * 4: LAYERS}
    for c in report.triton:
        assert c.operands[3] == (batch, KV_HEADS, CAPACITY, HEAD_DIM)  # the whole cache, one device
        if batch == 1:
            assert c.programs >= MIN_PROGRAMS, c


def test_prefill_lowers_for_cuda_with_the_kernel():
    # A 2048-token prompt runs in chunks of 512 (decode.PREFILL_CHUNK): every kernel call sees a
    # (512, 512) tree mask over a cache that grows chunk by chunk; no (P, P) array exists.
    module = lower_prefill(qwen3_8b_config(16), batch=1, prompt_len=2048, capacity=CAPACITY)
    report = inspect_module(module)
    assert report.host_callbacks == 0 and report.conditionals == 0
    assert report.whiles == 1  # the loop over chunks
    # Prefill needs no logits, so the last layer's attention output is unused and its kernel call
    # is dead code: every other layer launches once per chunk.
    (call,) = report.triton
    assert call.calls == LAYERS - 1
    assert call.operands[1] == (1, 512, 512) and call.operands[2] == (1, KV_HEADS, 512 * 4, HEAD_DIM)
    assert call.programs >= MIN_PROGRAMS
    assert not re.search(r"(?<![0-9])2048x2048(?![0-9])", str(module))  # no (P, P) array


def test_xla_fallback_on_cuda_has_no_conditionals():
    # head_dim 80 is not a power of 2: the kernel does not cover it and XLA attends on the GPU.
    # The CPU variant picks a key window with lax.switch and guards NaNs with lax.cond per layer;
    # the CUDA program must hold neither.
    report = inspect_module(lower_decode(qwen3_8b_config(16, head_dim=80), batch=1, capacity=CAPACITY))
    assert report.triton == []
    assert report.conditionals == 0 and report.host_callbacks == 0


def test_sampling_on_cuda_sorts_no_vocabulary_and_never_branches():
    """The sampling program (per-row temperature, top-k, top-p) finds its top-k / top-p cut-offs
    by bisection on CUDA; the CPU program of the same config sorts the vocabulary under a cond
    (the control: this inspection does see such sorts and branches)."""
    config = qwen3_8b_config(16, sample=True)
    vocab = QWEN3_8B.vocab_size
    cuda = inspect_module(lower_decode(config, batch=1, capacity=CAPACITY))
    assert not [s for s in cuda.sorts if s[-1] == vocab], cuda.sorts
    assert cuda.loop_body_conditionals == 0 and cuda.host_callbacks == 0
    cpu = inspect_module(lower_decode(config, batch=1, capacity=CAPACITY, platform="cpu"))
    assert [s for s in cpu.sorts if s[-1] == vocab] and cpu.loop_body_conditionals > 0


MESHES = textwrap.dedent("""
    import json, sys
    from jetspec_jax.lowering import inspect_module, lower_decode, lower_prefill, qwen3_8b_config
    from jetspec_jax.sharding import make_mesh

    out = {}
    for spec, batch in (("tp=8", 1), ("dp=2,tp=4", 8)):
        mesh = make_mesh(spec)
        config = qwen3_8b_config(64)
        for name, module in (
                ("decode", lower_decode(config, batch=batch, capacity=8192, mesh=mesh)),
                ("prefill", lower_prefill(config, batch=batch, prompt_len=512, capacity=8192, mesh=mesh))):
            r = inspect_module(module)
            out[f"{spec} {name}"] = {"calls": [[list(map(list, c.operands)), c.calls, c.programs] for c in r.triton],
                                     "conditionals": r.loop_body_conditionals, "callbacks": r.host_callbacks}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    script = tmp_path_factory.mktemp("lowering") / "meshes.py"
    script.write_text(MESHES)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("spec, rows, kv_heads", [("tp=8", 1, 1), ("dp=2,tp=4", 4, 2)])
def test_kernel_sees_its_own_shard_under_a_mesh(meshes, spec, rows, kv_heads):
    """tp=8: 4 query heads and 1 KV head per device; dp=2,tp=4 at B=8: 4 rows, 2 KV heads."""
    for name in ("decode", "prefill"):
        report = meshes[f"{spec} {name}"]
        assert report["conditionals"] == 0 and report["callbacks"] == 0
        assert report["calls"], "no Triton call"
        for operands, calls, programs in report["calls"]:
            lengths, mask, q, k, v = operands
            assert lengths == [rows] and mask[0] == rows
            assert k == v == [rows, kv_heads, CAPACITY, HEAD_DIM]
            assert q[:2] == [rows, kv_heads] and q[2] % (32 // 8) == 0
            if rows == 1:
                # Each device's launch fills its GPU, or splits the cache into one program per
                # 64-slot block (the head's 16-row block on 1 KV head: 128 programs, no more).
                assert programs >= min(MIN_PROGRAMS, CAPACITY // 64)
        if name == "decode":
            assert sum(c for _, c, _ in report["calls"]) == LAYERS + HEAD_LAYERS


PER_SHARD = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jetspec_jax.kernels import tree_attention
    from jetspec_jax.kernels.tree_attn import tree_attention_reference
    from jetspec_jax.sharding import make_mesh

    rng = np.random.default_rng(0)
    b, n, hq, hkv, s, d = 4, 8, 8, 4, 96, 16
    lengths = jnp.asarray([0, 5, 40, 80], jnp.int32)
    mask = np.tril(np.ones((n, n), bool)) & (rng.random((b, n, n)) < 0.6) | np.eye(n, dtype=bool)
    mask[:, :, 0] = True
    args = (jnp.asarray(rng.standard_normal((b, n, hq, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, hkv, s, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((b, hkv, s, d)), jnp.float32), lengths, jnp.asarray(mask))
    with jax.default_matmul_precision("highest"):
        want = np.asarray(tree_attention_reference(*args))
    out = {}
    for spec in ("dp=2,tp=2", "tp=4", "dp=4"):
        with jax.set_mesh(make_mesh(spec)):
            f = jax.jit(lambda *a: tree_attention(*a, implementation="pallas", interpret=True))
            text = f.lower(*args).as_text()
            got = np.asarray(f(*args))
        out[spec] = {"err": float(np.abs(got - want).max()), "manual": "manual_computation" in text}
    print(json.dumps(out))
""")


def test_sharded_kernel_equals_the_reference():
    """The shard_map around the kernel (interpret mode, 4 forced devices) computes what the
    unsharded reference computes, whichever axes split the batch rows and the heads."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", PER_SHARD], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for spec, result in out.items():
        assert result["manual"], f"{spec}: the kernel is not under shard_map"
        assert result["err"] < 2e-5, (spec, result)
