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
for k, n in [(64, 64), (576, 960)]:
    x = rng.standard_normal((c.MAX_ROWS, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    want = x.astype(np.float64) @ w
    for layout, w_in in (("kn", w), ("nk", np.ascontiguousarray(w.T)), ("packed", c.pack(w))):
        fn = jax.jit(lambda a, b: c.matmul(a, b, layout))
        one = np.stack([np.asarray(fn(x[i:i + 1], w_in))[0] for i in range(c.MAX_ROWS)])
        np.testing.assert_allclose(one, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))
        for rows in range(2, c.MAX_ROWS + 1):
            np.testing.assert_array_equal(np.asarray(fn(x[:rows], w_in)), one[:rows])
print("ok")
"""


def test_without_avx512_the_kernel_splits_rows_into_smaller_register_sets(tmp_path):
    """The code a CPU without AVX-512 gets (fewer rows per register set, so 7-10 rows take two
    sets sharing each tile of W; the packed layout takes 2 rows per set, so 3-10 rows go through
    its loop over register sets), compiled here with AVX-512 switched off."""
    out = subprocess.run([sys.executable, "-c", NARROW], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, JETSPEC_CACHE=str(tmp_path)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok"]


# (K, N) packable: one tile (no split between threads), uneven halves, K off every chunk, SmolLM2's.
PACKED_SHAPES = [(64, 32), (32, 96), (20, 64), (576, 960), (1536, 576)]
PACKED_ROWS = [1, 2, 3, 4, 5, 8, MAX_ROWS, 12, 13, 16]  # past one register set (12 rows) too


@pytest.mark.parametrize("k,n", PACKED_SHAPES)
def test_packed_layout_any_row_count_same_bits_as_one_row_and_as_kn(k, n):
    """The packed product against float64 numpy; each row's bits do not depend on how many rows
    share the call (so a tree of any size verifies with the AR step's bits), and are those of the
    "kn" kernel on the unpacked weight (packing changes no output)."""
    x, w = _rng_arrays(max(PACKED_ROWS), k, n, seed=k + n)
    packed = cpu_matmul.pack(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(cpu_matmul.unpack(packed)), w)
    fn = jax.jit(lambda a, b: matmul(a, b, "packed"))
    one_row = np.stack([np.asarray(fn(x[i : i + 1], packed))[0] for i in range(len(x))])
    np.testing.assert_allclose(one_row, x.astype(np.float64) @ w.astype(np.float64), rtol=1e-4, atol=1e-4 * np.sqrt(k))
    for rows in PACKED_ROWS[1:]:
        assert _uses_kernel(lambda a, b: matmul(a, b, "packed"), x[:rows], packed)
        np.testing.assert_array_equal(np.asarray(fn(x[:rows], packed)), one_row[:rows])
    if cpu_matmul.fits(MAX_ROWS, k, n, "kn"):
        kn = np.asarray(jax.jit(matmul)(x[:MAX_ROWS], w))
        np.testing.assert_array_equal(kn, one_row[:MAX_ROWS])


def test_packed_layout_elsewhere_gradients_and_bad_shapes():
    """Where the kernel does not run (more rows than PACKED_MAX_ROWS, bfloat16, a CUDA lowering) the
    packed weight still gives the product (XLA's dot on it); gradients are XLA's, through the packed
    array; a packed weight of the wrong rank is refused."""
    x, w = _rng_arrays(cpu_matmul.PACKED_MAX_ROWS + 1, 64, 96)
    packed = cpu_matmul.pack(jnp.asarray(w))
    assert not _uses_kernel(lambda a, b: matmul(a, b, "packed"), x, packed)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda a, b: matmul(a, b, "packed"))(x, packed)), x @ w,
                               rtol=1e-4, atol=1e-4)
    x = x[:4]
    xb, pb = x.astype(jnp.bfloat16), packed.astype(jnp.bfloat16)
    assert not _uses_kernel(lambda a, b: matmul(a, b, "packed"), xb, pb)
    got = jax.jit(lambda a, b: matmul(a, b, "packed"))(xb, pb)
    np.testing.assert_allclose(np.asarray(got, np.float32), x @ w, rtol=5e-2, atol=0.5)
    spec = jax.ShapeDtypeStruct
    text = (jax.jit(lambda a, b: matmul(a, b, "packed")).trace(spec((4, 576), jnp.float32), spec((30, 576, 32), jnp.float32))
            .lower(lowering_platforms=("cuda",)).as_text())
    assert "dot_general" in text and not any(name in text for name in TARGETS.values())

    def loss(a, b):
        return jnp.sum(jnp.sin(matmul(a, b, "packed")))
    gx, gp = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, packed)
    wx, ww = jax.grad(lambda a, b: jnp.sum(jnp.sin(a @ b)), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(wx), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(cpu_matmul.unpack(gp)), np.asarray(ww), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="3 axes"):
        matmul(x, w, "packed")
    assert cpu_matmul.packable(576, 960) and not cpu_matmul.packable(64, 48) and not cpu_matmul.packable(64, 16)


def test_decoding_params_pack_every_product_and_change_no_output(tiny_hf_models):
    """`model.for_cpu_decoding` (what Runner and the benchmark build once) packs every layer's
    product and adds the tied embedding as a packed LM head: the lowered decoding step calls only
    the packed kernel, its hidden states are bit for bit those of the weights as loaded (same sums,
    another layout) and its logits those of the embedding (float32 rounding apart); an untied
    head is packed in place and still gives its rows for a draft table; Runner holds the packed
    form."""
    from jetspec_jax.layers import PACKED
    from jetspec_jax.loading import load_model
    from jetspec_jax.model import LM_HEAD_PACKED, Transformer, for_cpu_decoding, init_cache, output_rows
    from jetspec_jax.runner import Runner
    from jetspec_jax.step import DecodeConfig

    for name in ("llama", "qwen3"):  # tied, untied
        model = load_model(tiny_hf_models[name])
        cfg = model.config
        params = for_cpu_decoding(cfg, model.params)
        mlp = params["layers_0"]["mlp"]["gate_up_proj"]
        assert PACKED in mlp and "kernel" not in mlp
        assert (LM_HEAD_PACKED in params) == cfg.tie_embeddings
        assert (PACKED in params.get("lm_head", {})) == (not cfg.tie_embeddings)

        def forward(p, tokens, with_logits):
            b, t = tokens.shape
            pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) + 5
            mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
            cache = init_cache(cfg, b, 32).replace(lengths=jnp.full((b,), 5, jnp.int32))
            logits, taps, _ = Transformer(cfg).apply({"params": p}, tokens, pos, cache, mask,
                                                     taps=(0, cfg.num_layers - 1), with_logits=with_logits)
            return logits if with_logits else taps

        tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 4)), jnp.int32)
        text = jax.jit(forward, static_argnums=2).lower(params, tokens, True).as_text()
        assert "jetspec_matmul_packed" in text and "jetspec_matmul_kn" not in text and "jetspec_matmul_nk" not in text
        np.testing.assert_array_equal(np.asarray(forward(params, tokens, False)), np.asarray(forward(model.params, tokens, False)))
        np.testing.assert_allclose(np.asarray(forward(params, tokens, True)), np.asarray(forward(model.params, tokens, True)),
                                   rtol=1e-5, atol=1e-5)
        ids = jnp.asarray([3, 1, 7], jnp.int32)
        np.testing.assert_array_equal(np.asarray(output_rows(cfg, params, ids)), np.asarray(output_rows(cfg, model.params, ids)))
        held = Runner({"target": model.params}, DecodeConfig(target=cfg)).params["target"]
        assert PACKED in held["layers_0"]["attn"]["o_proj"]
