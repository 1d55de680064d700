"""The GPU programs, lowered for CUDA on any machine, and what they contain.

No GPU is needed: `jax.jit(f).trace(*abstract).lower(lowering_platforms=("cuda",))` turns every
Pallas call into its Triton custom call (with its launch grid) and every array into a shape, so a
Qwen3-8B-sized decode loop lowers in seconds without allocating a byte (DESIGN.md section 6).

    config = qwen3_8b_config(budget=64)
    module = lower_decode(config, batch=1, capacity=8192)           # an MLIR module
    report = inspect_module(module)
    report.triton  # [TritonCall(grid=(1, 4, 66), operands=((1, 64, 32, 128), ...), calls=36), ...]

`inspect_module` reads the module as a tree of operations (the MLIR Python bindings), following
`func.call`s into the private functions JAX outlines (a jitted function called by 36 layers is one
function with 36 call sites), so every count below is per execution of the program, per loop trip.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp

from jetspec_jax.config import ModelConfig
from jetspec_jax.head import init_head_params
from jetspec_jax.loading.head_io import head_config_from_hf
from jetspec_jax.model import init_params
from jetspec_jax.step import DecodeConfig
from jetspec_jax.tree import TreeConfig

TRITON_TARGET = "__gpu$xla.gpu.triton"

# Qwen3-8B (HF config.json of Qwen/Qwen3-8B).
QWEN3_8B = ModelConfig(vocab_size=151936, hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8,
                       head_dim=128, intermediate_size=12288, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       qk_norm=True, tie_embeddings=False, max_position_embeddings=40960, dtype="bfloat16")

# config.json of the published JetSpec Qwen3-8B head (JetSpec/jetspec-qwen3-8b on Hugging Face),
# parsed by the same reader as a downloaded head, so the lowered programs run the published layout:
# 5 causal layers tapping target layers (1, 9, 17, 25, 33), block size 16, mask token 151669.
# Where each key comes from (and which values could not be read off the file itself):
# tests/test_published_head.py.
QWEN3_8B_HEAD_HF = {
    "architectures": ["DFlashDraftModel"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
    "block_size": 16,
    "bos_token_id": 151643,
    "dflash_config": {"causal_head": True, "mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]},
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
    "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"},
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN3_8B_HEAD = head_config_from_hf(QWEN3_8B_HEAD_HF, dtype="bfloat16")


def qwen3_8b_config(budget: int, attention_impl: str = "auto", head_dim: int | None = None,
                    sample: bool = False) -> DecodeConfig:
    """Qwen3-8B with its 5-layer head and a best-first tree of `budget` nodes (width 8, depth 15).
    head_dim: another head size for both models (e.g. 80, which the Pallas kernel does not cover).
    sample: the program that samples (temperature, top-k, top-p per row) instead of greedy only."""
    target = QWEN3_8B.replace(attention_impl=attention_impl)
    head = dataclasses.replace(QWEN3_8B_HEAD, attention_impl=attention_impl)
    if head_dim is not None:
        target, head = target.replace(head_dim=head_dim), dataclasses.replace(head, head_dim=head_dim)
    return DecodeConfig(target=target, head=head, tree=TreeConfig(budget=budget, width=8, depth=15), sample=sample)


def abstract_params(config: DecodeConfig, mesh=None) -> dict:
    """{"target", "head"} as ShapeDtypeStructs (in their shardings on `mesh`); nothing allocated."""
    from jetspec_jax.sharding import param_shardings

    params = jax.eval_shape(lambda: {"target": init_params(config.target, jax.random.PRNGKey(0)),
                                     "head": init_head_params(config.head, jax.random.PRNGKey(1))})
    return _placed(params, None if mesh is None else param_shardings(params, config, mesh))


def _placed(tree, shardings):
    if shardings is None:
        return tree
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _prefill_args(config: DecodeConfig, batch: int, prompt_len: int, mesh):
    from jetspec_jax.decode import make_sampling

    rows = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    args = (rows((batch, prompt_len)), rows((batch,)), rows((batch,)), jax.eval_shape(lambda: make_sampling(batch)))
    if mesh is not None:
        shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("dp"))
        args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard), args)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        stop = args[3].stop_ids
        args = (*args[:3], args[3].replace(stop_ids=jax.ShapeDtypeStruct(stop.shape, stop.dtype, sharding=replicated)))
    return args


def lower_prefill(config: DecodeConfig, *, batch: int, prompt_len: int, capacity: int, mesh=None):
    """The prefill program (the target over B prompts of `prompt_len`, then the head's context),
    lowered for CUDA -> an MLIR module."""
    from jetspec_jax.decode import prefill

    args = _prefill_args(config, batch, prompt_len, mesh)
    traced = prefill.trace(abstract_params(config, mesh), *args, config=config, capacity=capacity, mesh=mesh)
    return traced.lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")


def lower_decode(config: DecodeConfig, *, batch: int, capacity: int, mesh=None, prompt_len: int = 128,
                 platform: str = "cuda"):
    """The decoding loop (rounds of draft, verify, accept, commit until done), lowered for CUDA
    (or `platform`, e.g. "cpu", to compare)."""
    from jetspec_jax.decode import decode, prefill
    from jetspec_jax.sharding import state_shardings

    params = abstract_params(config, mesh)
    state = jax.eval_shape(lambda p, *a: prefill(p, *a, config=config, capacity=capacity), params,
                           *_prefill_args(config, batch, prompt_len, None))
    state = _placed(state, None if mesh is None else state_shardings(state, config, mesh))
    traced = decode.trace(params, state, jax.ShapeDtypeStruct((), jnp.int32), config=config, mesh=mesh)
    return traced.lower(lowering_platforms=(platform,)).compiler_ir("stablehlo")


@dataclasses.dataclass(frozen=True)
class TritonCall:
    grid: tuple  # (grid_x, grid_y, grid_z) of the launch
    operands: tuple  # operand shapes, as the kernel (one device's shard) sees them
    calls: int  # launches per execution (per loop trip inside a loop)
    name: str = ""  # the kernel's name

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@dataclasses.dataclass
class Report:
    triton: list  # TritonCall per distinct kernel launch site
    whiles: int  # while loops, counting each loop once per execution of its parent
    loop_body_whiles: int  # while loops inside the outermost loop's body (per trip)
    loop_body_conditionals: int  # real conditionals (if, case with > 1 live branch) in that body
    conditionals: int  # real conditionals anywhere
    host_callbacks: int  # custom calls into the host (Python callbacks)
    sorts: list  # operand shapes of every sort (per execution, repeated per call)


def _ops(block):
    for op in block.operations:
        yield op


def _attr(op, name):
    try:
        return op.attributes[name]
    except (KeyError, ValueError):
        return None


def _string(attr) -> str:
    return "" if attr is None else str(attr).strip('"').lstrip("@")


def _is_constant_remap(op) -> bool:
    """The case JAX emits to map a platform index to the kept branch: every region returns a
    constant and nothing else (XLA folds it; it is not a runtime branch)."""
    for region in op.regions:
        for block in region.blocks:
            names = [o.name for o in _ops(block)]
            if names not in (["stablehlo.constant", "stablehlo.return"], ["stablehlo.return"]):
                return False
    return True


def _is_conditional(op) -> bool:
    if op.name == "stablehlo.if":
        return True
    return op.name == "stablehlo.case" and len(op.regions) > 1 and not _is_constant_remap(op)


def inspect_module(module) -> Report:
    funcs = {}
    for op in module.body.operations:
        if op.operation.name == "func.func":
            funcs[_string(_attr(op.operation, "sym_name"))] = op.operation

    memo = {}

    def walk(region_owner, in_loop: bool):
        """-> Counter of facts for one execution of the regions of `region_owner`."""
        out = collections.Counter()
        triton = collections.Counter()
        for region in region_owner.regions:
            for block in region.blocks:
                for op in _ops(block):
                    op = op.operation
                    name = op.name
                    if name == "func.call":
                        sub, sub_triton = visit(_string(_attr(op, "callee")), in_loop)
                        out += sub
                        triton += sub_triton
                        continue
                    if name == "stablehlo.custom_call":
                        target = _string(_attr(op, "call_target_name"))
                        if target == TRITON_TARGET:
                            config = _attr(op, "mhlo.backend_config")
                            grid = tuple(int(str(config[f"grid_{a}"]).split(":")[0]) for a in "xyz")
                            shapes = tuple(tuple(v.type.shape) for v in op.operands)
                            triton[(grid, shapes, _string(config["name"]))] += 1
                        elif "callback" in target.lower():
                            out["host_callbacks"] += 1
                    if name == "stablehlo.sort":
                        out[("sort", tuple(op.operands[0].type.shape))] += 1
                    if name == "stablehlo.while":
                        out["whiles"] += 1
                        out["loop_body_whiles"] += in_loop
                    if _is_conditional(op):
                        out["conditionals"] += 1
                        out["loop_body_conditionals"] += in_loop
                    sub, sub_triton = walk(op, in_loop or name == "stablehlo.while")
                    out += sub
                    triton += sub_triton
        return out, triton

    def visit(fname, in_loop):
        key = (fname, in_loop)
        if key not in memo:
            memo[key] = walk(funcs[fname], in_loop)
        return memo[key]

    counts, triton = visit("main", False)
    calls = [TritonCall(grid=g, operands=s, calls=n, name=kname) for (g, s, kname), n in triton.items()]
    return Report(triton=sorted(calls, key=lambda c: (c.operands, c.grid)), whiles=counts["whiles"],
                  loop_body_whiles=counts["loop_body_whiles"], loop_body_conditionals=counts["loop_body_conditionals"],
                  conditionals=counts["conditionals"], host_callbacks=counts["host_callbacks"],
                  sorts=sorted(shape for key, n in counts.items() if isinstance(key, tuple) for shape in [key[1]] * n))
