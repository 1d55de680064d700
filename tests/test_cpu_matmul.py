"""kernels/cpu_matmul: the small-row CPU product against float64 numpy, row for row the same bits
whatever the row count, XLA's dot wherever it does not apply (and in gradients, vmap, CUDA
lowerings), and the library's programs using it (export, the model)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetspec_jax.kernels import cpu_matmul
from jetspec_jax.kernels.cpu_matmul import MAX_ROWS, TARGETS, matmul

pytestmark = pytest.mark.skipif(not cpu_matmul.enabled(), reason="the CPU kernel cannot run on this machine")

# (K, N): N of one tile (no split between threads), uneven halves, SmolLM2's qkv and a wide head.
SHAPES = [(64, 16), (32, 48), (576, 960), (1536, 576), (96, 4112)]


def _rng_arrays(rows, k, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)


def _uses_kernel(fn, *args) -> bool:
    return any(name in jax.jit(fn).lower(*args).as_text() for name in TARGETS.values())


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("k,n", SHAPES)
def test_matches_float64_and_rows_do_not_depend_on_the_row_count(layout, k, n):
    if layout == "nk" and n % 4:
        n += 4 - n % 4
    x, w = _rng_arrays(MAX_ROWS, k, n)
    w_in = w if layout == "kn" else np.ascontiguousarray(w.T)
    fn = jax.jit(lambda a, b: matmul(a, b, layout))
    want = x.astype(np.float64) @ w.astype(np.float64)
    one_row = np.stack([np.asarray(fn(x[i : i + 1], w_in))[0] for i in range(MAX_ROWS)])
    np.testing.assert_allclose(one_row, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    for rows in range(2, MAX_ROWS + 1):
        assert _uses_kernel(lambda a, b: matmul(a, b, layout), x[:rows], w_in)
        got = np.asarray(fn(x[:rows], w_in))
        np.testing.assert_array_equal(got, one_row[:rows])  # a tree's rows = the AR step's bits


def test_leading_axes_and_dense_general_kernels():
    x, w = _rng_arrays(6, 64, 96)
    got = jax.jit(matmul)(x.reshape(2, 3, 64), w)
    np.testing.assert_allclose(np.asarray(got).reshape(6, 96), x @ w, rtol=1e-5, atol=1e-4)
    w4 = w.reshape(64, 2, 3, 16)  # a DenseGeneral kernel (d, Hkv, G + 2, Dh)
    dims = (((2,), (0,)), ((), ()))
    got = jax.jit(lambda a, b: cpu_matmul.dot_general(a, b, dims))(x.reshape(2, 3, 64), w4)
    assert got.shape == (2, 3, 2, 3, 16)
    np.testing.assert_allclose(np.asarray(got).reshape(6, 96), x @ w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", ["too many rows", "bfloat16", "K off the chunk", "N off the tile", "batched"])
def test_xla_serves_what_the_kernel_does_not_tile(case):
    x, w = _rng_arrays(3, 64, 32)
    fn = matmul
    if case == "too many rows":
        x, w = _rng_arrays(MAX_ROWS + 1, 64, 32)
    elif case == "bfloat16":
        x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    elif case == "K off the chunk":
        x, w = _rng_arrays(3, 60, 32)
    elif case == "N off the tile":
        x, w = _rng_arrays(3, 64, 40)
    else:  # a batched contraction is not a Dense product
        dims = (((1,), (0,)), ((), ()))
        assert _uses_kernel(lambda a, b: cpu_matmul.dot_general(a, b, dims), x, w)
        batched = (((2,), (1,)), ((0,), (0,)))
        fn = lambda a, b: cpu_matmul.dot_general(a, b, batched)  # noqa: E731
        x, w = np.stack([x, x]), np.stack([w, w])
    assert not _uses_kernel(fn, x, w)
    want = jax.lax.dot_general(x, w, (((x.ndim - 1,), (w.ndim - 2,)), ((0,), (0,)) if x.ndim == 3 else ((), ())))
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(x, w), np.float32), np.asarray(want, np.float32), rtol=1e-2)


def test_gradients_and_vmap_are_xla_s():
    x, w = _rng_arrays(4, 64, 32)
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))  # noqa: E731
    got = jax.jit(jax.grad(loss(matmul), argnums=(0, 1)))(x, w)
    want = jax.grad(loss(lambda a, b: a @ b), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)
    xs = np.stack([x, 2 * x, -x])
    got = jax.jit(jax.vmap(matmul, in_axes=(0, None)))(xs, w)
    np.testing.assert_allclose(np.asarray(got), xs @ w, rtol=1e-5, atol=1e-4)


def test_cuda_lowering_has_no_cpu_kernel():
    x = jax.ShapeDtypeStruct((4, 576), jnp.float32)
    w = jax.ShapeDtypeStruct((576, 960), jnp.float32)
    text = jax.jit(matmul).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "dot_general" in text and not any(name in text for name in TARGETS.values())
    assert _uses_kernel(matmul, x, w)  # the same function on this CPU


def test_many_calls_in_one_program_agree():
    """Products issued back to back (and beside each other) in one program: every one finishes
    before its result is read, whichever thread computed its second half."""
    x, w = _rng_arrays(5, 576, 960)

    @jax.jit
    def chain(a, b):
        outs = []
        for i in range(24):
            outs.append(matmul(a * (1.0 + i / 24), b))
        return jnp.stack(outs)

    got = np.asarray(chain(x, w))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(chain(x, w)), got)
    np.testing.assert_allclose(got[0], x @ w, rtol=1e-4, atol=1e-3)


def test_exported_program_with_the_kernel_runs_after_a_round_trip():
    from jax import export

    x, w = _rng_arrays(3, 64, 32)
    checks = [export.DisabledSafetyCheck.custom_call(name) for name in TARGETS.values()]
    exported = export.export(jax.jit(matmul), disabled_checks=checks)(x, w)
    again = export.deserialize(exported.serialize())
    np.testing.assert_array_equal(np.asarray(again.call(x, w)), np.asarray(jax.jit(matmul)(x, w)))


def test_switched_off_by_environment():
    code = ("from jetspec_jax.kernels import cpu_matmul as c; import numpy as np, jax; "
            "x = np.ones((2, 64), np.float32); w = np.ones((64, 32), np.float32); "
            "t = jax.jit(c.matmul).lower(x, w).as_text(); print(c.enabled(), 'jetspec_matmul' in t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JETSPEC_CPU_MATMUL="0"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_machine_code_is_cached_and_reused(tmp_path):
    code = ("import time; t = time.perf_counter(); from jetspec_jax.kernels import cpu_matmul as c; "
            "assert c.enabled(); print(len(list(c._object_dir().glob('*.o'))))")
    env = dict(os.environ, JETSPEC_CACHE=str(tmp_path))
    stamps = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["1"]
        (obj,) = (tmp_path / "cpu_matmul").glob("*.o")
        stamps.append(obj.stat().st_mtime_ns)
    assert stamps[0] == stamps[1]  # the second process loaded it instead of compiling and writing again
    assert obj.stat().st_size > 1000 and not list((tmp_path / "cpu_matmul").glob("*.tmp-*"))


def test_the_model_uses_it_for_decoding_rows_only(tiny_hf_models):
    """A decoding step and a small tree go through the kernel; a long prefill stays with XLA."""
    from jetspec_jax.loading import load_model
    from jetspec_jax.model import Transformer, init_cache

    model = load_model(tiny_hf_models["llama"])  # tied embeddings: the "nk" head too
    cfg = model.config

    def forward(tokens):
        b, t = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
        return Transformer(cfg).apply({"params": model.params}, tokens, pos, init_cache(cfg, b, 32), mask)[0]

    for t, expect in ((1, True), (4, True), (MAX_ROWS + 6, False)):
        text = jax.jit(forward).lower(jnp.zeros((1, t), jnp.int32)).as_text()
        assert ("jetspec_matmul_kn" in text) == expect and ("jetspec_matmul_nk" in text) == expect


NARROW = """
import llvmlite.binding as llvm
features = llvm.get_host_cpu_features()
for name in list(features):
    if name.startswith("avx512"):
        features[name] = False
llvm.get_host_cpu_features = lambda: features
import jax, numpy as np
from jetspec_jax.kernels import cpu_matmul as c
assert c.enabled()
rng = np.random.default_rng(1)
for k, n in [(64, 48), (576, 960)]:
    x = rng.standard_normal((c.MAX_ROWS, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    want = x.astype(np.float64) @ w
    for layout, w_in in (("kn", w), ("nk", np.ascontiguousarray(w.T))):
        fn = jax.jit(lambda a, b: c.matmul(a, b, layout))
        one = np.stack([np.asarray(fn(x[i:i + 1], w_in))[0] for i in range(c.MAX_ROWS)])
        np.testing.assert_allclose(one, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))
        for rows in range(2, c.MAX_ROWS + 1):
            np.testing.assert_array_equal(np.asarray(fn(x[:rows], w_in)), one[:rows])
print("ok")
"""


def test_without_avx512_the_kernel_splits_rows_into_smaller_register_sets(tmp_path):
    """The code a CPU without AVX-512 gets (fewer rows per register set, so 7-10 rows take two
    sets sharing each tile of W), compiled here with AVX-512 switched off."""
    out = subprocess.run([sys.executable, "-c", NARROW], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, JETSPEC_CACHE=str(tmp_path)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok"]


def test_lm_head_copy_serves_the_same_logits_in_the_kernel_s_faster_layout(tiny_hf_models):
    """`with_lm_head_copy` adds the tied embedding transposed for the "kn" kernel (Runner builds it
    once): the logits stay those of the embedding (float32 rounding apart), untied heads get none."""
    from jetspec_jax.loading import load_model
    from jetspec_jax.model import LM_HEAD_T, Transformer, with_lm_head_copy
    from jetspec_jax.runner import Runner
    from jetspec_jax.step import DecodeConfig

    model = load_model(tiny_hf_models["llama"])  # tied embeddings
    cfg = model.config
    params = with_lm_head_copy(cfg, model.params)
    table = model.params["embed"]["embedding"]
    np.testing.assert_array_equal(np.asarray(params[LM_HEAD_T]), np.asarray(table).T)
    assert with_lm_head_copy(cfg, params) is params  # built once

    def logits(p, h):
        return Transformer(cfg).apply({"params": p}, h, method=Transformer.logits)

    h = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, cfg.hidden_size)), jnp.float32)
    text = jax.jit(logits).lower(params, h).as_text()
    assert "jetspec_matmul_kn" in text and "jetspec_matmul_nk" not in text
    np.testing.assert_allclose(np.asarray(logits(params, h)), np.asarray(logits(model.params, h)), rtol=1e-5, atol=1e-5)
    assert LM_HEAD_T in Runner({"target": model.params}, DecodeConfig(target=cfg)).params["target"]
    untied = load_model(tiny_hf_models["qwen3"])
    assert not untied.config.tie_embeddings
    assert with_lm_head_copy(untied.config, untied.params) is untied.params
