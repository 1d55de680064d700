"""Sharded decoding with JAX's own SPMD machinery: a (dp, tp) device mesh and named shardings.

    mesh = make_mesh("dp=2,tp=4")                  # 8 devices
    params = shard_params(params, config, mesh)    # every weight placed in its own sharding
    out = generate(params, prompts, config, max_new_tokens=64, mesh=mesh)

Nothing here schedules work: parameters and decoding state are placed with `NamedSharding`s and
`jax.jit` partitions prefill and the decoding loop from them (XLA's SPMD partitioner inserts the
collectives). `decode.py` pins the state's layout inside its jitted functions with
`constrain_state`, so every round keeps the layout below and later calls reuse the same program.

Mesh axes:
    dp  batch rows (each row's caches, tokens and sampling values live on one dp slice)
    tp  attention heads (q/o projections, KV caches when the KV heads divide evenly), the MLP
        hidden width (each MoE expert's too) and the vocabulary (when it divides evenly)

Every array is described by logical axis names; `logical_rules` maps them to mesh axes for one
model. Worked example, SmolLM2-135M (9 query / 3 KV heads, head_dim 64, ffn 1536, vocab 49152)
on tp=3: qkv_proj kernel (576, 3, 5, 64) -> ("embed", "kv_heads", None, None) -> P(None, "tp"),
each device holds one KV head with its 3 query heads; o_proj (576, 576) -> P("tp", None);
down_proj (1536, 576) -> P("tp", None); a target cache layer (B, 3, S, 64) -> P("dp", "tp", None, None).
Where tp does not divide the KV heads, the qkv projection is replicated.
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jetspec_jax.cache import KVCache
from jetspec_jax.errors import UserError
from jetspec_jax.step import DecodeConfig, DecodeState, SamplingParams

MESH_AXES = ("dp", "tp")

# (module, parameter) -> logical axes of the array; the last two names of a parameter's path.
# Dense kernels are (in, out); "q_heads" is the flattened (heads * head_dim) axis of o_proj's input,
# "kv_heads" the KV-head axis of the fused qkv kernel (each KV group with its query heads).
PARAM_AXES = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("qkv_proj", "kernel"): ("embed", "kv_heads", None, None),  # (d, Hkv, G+2, Dh), see layout.py
    ("qkv_proj", "bias"): ("kv_heads", None, None),
    ("o_proj", "kernel"): ("q_heads", "embed"),
    ("o_proj", "bias"): ("embed",),
    ("q_norm", "scale"): ("head_dim",),
    ("k_norm", "scale"): ("head_dim",),
    ("gate_up_proj", "kernel"): ("embed", None, "mlp"),  # (d, 2, F)
    ("down_proj", "kernel"): ("mlp", "embed"),
    # MoE layers (moe.py): experts stacked on a leading axis, each expert's width split like the
    # dense MLP's, so every device runs every expert on its slice; the router is replicated.
    ("router", "kernel"): ("embed", None),  # (d, E)
    ("experts", "gate_up_proj"): (None, "embed", None, "mlp"),  # (E, d, 2, F)
    ("experts", "down_proj"): (None, "mlp", "embed"),  # (E, F, d)
    ("fc", "kernel"): ("features", "embed"),  # the head's tap projection, taps*d -> d
    ("d2t",): (None,),  # a reduced-vocabulary head's draft ids (K,) int32: replicated
    ("ngram_keys",): (None,),  # the answer n-gram table (ngrams.py), (M,) int32 each: replicated
    ("ngram_next",): (None,),
    ("input_norm", "scale"): ("embed",),
    ("post_attn_norm", "scale"): ("embed",),
    ("final_norm", "scale"): ("embed",),
    ("hidden_norm", "scale"): ("embed",),
    ("norm", "scale"): ("embed",),
}
CACHE_AXES = ("batch", "kv_heads_cache", None, None)  # (B, Hkv, S, Dh)


def parse_mesh(spec: str) -> dict:
    """"dp=2,tp=4" -> {"dp": 2, "tp": 4}; an axis left out has size 1. UserError on bad input."""
    sizes = {}
    for part in str(spec).split(","):
        name, eq, value = part.strip().partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES:
            raise UserError(f"bad --mesh {spec!r}: expected axes like dp=2,tp=4 (axes: dp, tp)")
        if name in sizes:
            raise UserError(f"bad --mesh {spec!r}: axis {name} given twice")
        try:
            sizes[name] = int(value.strip())
        except ValueError:
            raise UserError(f"bad --mesh {spec!r}: {name} must be a whole number") from None
        if sizes[name] < 1:
            raise UserError(f"bad --mesh {spec!r}: {name} must be >= 1")
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def make_mesh(spec) -> Mesh:
    """A ("dp", "tp") mesh from "dp=2,tp=4" or {"dp": 2, "tp": 4}.

    Uses the first dp*tp devices (all of them when several processes take part, so that every
    process owns a part of the mesh). tp is the inner axis: on one host, tp groups are neighbours.
    """
    sizes = parse_mesh(spec) if isinstance(spec, str) else {a: int(spec.get(a, 1)) for a in MESH_AXES}
    need = math.prod(sizes.values())
    have = jax.device_count()
    text = ",".join(f"{a}={n}" for a, n in sizes.items())
    if need > have or (jax.process_count() > 1 and need != have):
        rule = "all of them" if jax.process_count() > 1 else f"at most {have}"
        raise UserError(f"mesh {text} needs {need} devices; {have} available "
                        f"across {jax.process_count()} process(es) (use {rule})")
    # Auto axes: jit's sharding propagation decides intermediate layouts (Explicit axes would
    # make every ambiguous op, e.g. the embedding gather, demand an out_sharding).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, auto, devices=jax.devices()[:need])


def as_mesh(mesh) -> Mesh | None:
    """None, a Mesh, or a spec string/dict -> None or a Mesh."""
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    return make_mesh(mesh)


def _axis(mesh: Mesh, name: str) -> int:
    return mesh.shape.get(name, 1)


def check_mesh_fits(model_config, head_config, mesh: Mesh) -> None:
    """One-line UserError unless tp divides the query heads and MLP widths of target and head
    (for a MoE target, the experts' width on its sparse layers, the dense width on the others).

    KV heads and the vocabulary that tp does not divide are replicated (see `logical_rules`).
    """
    tp = _axis(mesh, "tp")
    for what, cfg in (("target", model_config), ("draft head", head_config)):
        if cfg is None:
            continue
        widths = _mlp_widths(cfg)
        for field, size in (("attention heads", cfg.num_heads), *widths):
            if size % tp:
                raise UserError(f"mesh tp={tp} does not divide the {what}'s {size} {field}; use a tp that "
                                f"divides {cfg.num_heads} heads and {' and '.join(str(w) for _, w in widths)}")


def _mlp_widths(cfg) -> list:
    """[(name, width)] of the feed-forward widths `cfg`'s layers use (the head has no experts)."""
    sparse = [getattr(cfg, "is_sparse_layer", lambda i: False)(i) for i in range(cfg.num_layers)]
    widths = [] if all(sparse) else [("MLP width", cfg.intermediate_size)]
    return widths + ([("expert MLP width", cfg.moe_intermediate_size)] if any(sparse) else [])


def logical_rules(cfg, mesh: Mesh, vocab_size: int) -> dict:
    """Logical axis -> mesh axis (or None) for one model (target ModelConfig or HeadConfig)."""
    tp = _axis(mesh, "tp")
    return {
        "batch": "dp",
        "q_heads": "tp",
        "mlp": "tp",
        "kv_heads": "tp" if cfg.num_kv_heads % tp == 0 else None,
        "kv_heads_cache": "tp" if cfg.num_kv_heads % tp == 0 else None,
        "vocab": "tp" if vocab_size % tp == 0 else None,
    }


def _spec(axes, rules) -> P:
    return P(*(rules.get(a) if a is not None else None for a in axes))


def _path_names(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_axes(path, ndim: int) -> tuple:
    """Logical axes of the parameter at `path` (a tree path); unknown parameters raise."""
    names = _path_names(path)
    axes = PARAM_AXES.get(names[-2:])
    if axes is None or len(axes) != ndim:
        raise ValueError(f"no sharding rule for parameter {'/'.join(names)} ({ndim}-d)")
    return axes


def _model_shardings(params, cfg, mesh: Mesh, vocab_size: int):
    rules = logical_rules(cfg, mesh, vocab_size)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, _spec(param_axes(path, len(x.shape)), rules)), params)


def param_shardings(params, config: DecodeConfig, mesh: Mesh) -> dict:
    """{"target": ..., "head": ...} pytree of NamedShardings matching `params` (arrays or
    `jax.ShapeDtypeStruct`s, e.g. to restore a checkpoint straight into its shardings)."""
    vocab = config.target.vocab_size
    out = {"target": _model_shardings(params["target"], config.target, mesh, vocab)}
    if "head" in params:
        if config.head is None:
            raise ValueError("params hold a draft head but the config has none")
        out["head"] = _model_shardings(params["head"], config.head, mesh, vocab)
    return out


def place(x, sharding: NamedSharding):
    """Put one array (host or device) into `sharding`. With several processes every process
    passes the same global value and keeps only its own shards."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        data = place(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global: reshard on device
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(params, config: DecodeConfig, mesh: Mesh) -> dict:
    """Check that the mesh fits and place every parameter in its sharding (no-op if it is)."""
    check_mesh_fits(config.target, config.head, mesh)
    return jax.tree.map(place, params, param_shardings(params, config, mesh))


def _cache_shardings(cache: KVCache, cfg, mesh: Mesh) -> KVCache:
    rules = logical_rules(cfg, mesh, 1)
    layer = NamedSharding(mesh, _spec(CACHE_AXES, rules))
    return KVCache(k=tuple(layer for _ in cache.k), v=tuple(layer for _ in cache.v),
                   lengths=NamedSharding(mesh, P("dp")))


def state_shardings(state: DecodeState, config: DecodeConfig, mesh: Mesh) -> DecodeState:
    """A DecodeState of NamedShardings: caches P(dp, tp|None, None, None), per-row arrays P(dp),
    the shared stop ids replicated. Works on abstract states (inside jit) too."""
    batch = state.root.shape[0]
    dp = _axis(mesh, "dp")
    if batch % dp:
        raise ValueError(f"batch {batch} is not a multiple of dp={dp}; pad it (see padded_batch)")
    rows = NamedSharding(mesh, P("dp"))
    head_cache = None
    if state.head_cache is not None:
        head_cache = _cache_shardings(state.head_cache, config.head, mesh)
    return DecodeState(
        target_cache=_cache_shardings(state.target_cache, config.target, mesh),
        head_cache=head_cache, root=rows, tokens=rows, history=rows, num_new=rows, max_new=rows, done=rows,
        rounds=rows, accept_lengths=rows,
        sampling=SamplingParams(temperature=rows, top_k=rows, top_p=rows, key=rows,
                                stop_ids=NamedSharding(mesh, P())),
    )


def traced_on(mesh: Mesh | None):
    """Inside jit: a context that makes `mesh` the abstract mesh of what is traced under it, so
    the tree-attention kernel runs per shard (kernels/tree_attn/api.py); no-op for None."""
    return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def constrain_state(state: DecodeState, config: DecodeConfig, mesh: Mesh) -> DecodeState:
    """Inside jit: pin the state's layout so the loop carry and the outputs keep it."""
    return jax.lax.with_sharding_constraint(state, state_shardings(state, config, mesh))


def padded_batch(batch: int, mesh: Mesh | None) -> int:
    """Rows actually decoded: `batch` rounded up to a multiple of dp."""
    dp = 1 if mesh is None else _axis(mesh, "dp")
    return -(-batch // dp) * dp


def place_rows(tree, mesh: Mesh | None):
    """Shard every leaf of a pytree of per-row arrays (leading batch axis) over dp."""
    if mesh is None:
        return tree
    rows = NamedSharding(mesh, P("dp"))
    return jax.tree.map(lambda x: place(x, rows), tree)


def to_host(tree):
    """jax.device_get that also reads arrays spread over several processes (every process gets
    the whole value)."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(get, tree)


def place_replicated(x, mesh: Mesh):
    """A copy of `x` on every device of the mesh."""
    return place(x, NamedSharding(mesh, P()))
