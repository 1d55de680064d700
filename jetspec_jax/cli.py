"""`python -m jetspec_jax.generate`: generate text with a target model and (optionally) a draft head.

Bad input never ends in a traceback: it prints one `error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from jetspec_jax.errors import UserError

MODES = ("ar", "chain", "tree")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one line
        raise UserError(message)


# Tree nodes per round when --budget / --lookup are not given: the fastest configuration of the
# bench's sweeps for the shipped SmolLM2 head on CPU (2-core machine): 2026-12-02, budgets 2, 4, 8, 16
# x lookup 0, 2 (N=4 with 2 lookup nodes 1.11x AR, without lookup 0.95x, N=8 with lookup 0.99x);
# 2026-12-06 with kernels/cpu_matmul (verifying 4 tokens 1.23x an AR step instead of 1.6x; stage-9
# head, `docs/bench/small-budgets/report.md`), budgets 3-6 x lookup 2, 3: every config 1.09-1.18x
# AR, N=4 with 2 lookup nodes 1.15x (1.22x in docs/bench the same hour), N=4 with 3 1.18x, N=3 with 2
# 1.17x: within the run-to-run noise, so the default stays; 2026-12-06 23:52 UTC with the packed weight
# layout and the stage-11 head (docs/bench/report.md), budgets 4, 6, 8 x lookup 0, 2: N=4 with 2 lookup
# nodes 1.51x AR, the fastest (N=8 with 2: 1.45x, N=6 with 2: 1.42x, without lookup 1.30-1.37x);
# 2026-12-07 09:25 UTC with the stage-12 head and the longest-match lookup that gives rows without a
# match the head's whole tree (docs/bench/report.md), budgets 4, 8, 16 x lookup 0, 2, all: N=4 with
# all (= 3) nodes 1.53x AR, the fastest (N=4 with 2: 1.50x, N=8 with all (= 7): 1.45x, the best on
# MATH-500 at 1.87x; N=16: 0.64-0.80x, verifying 16 nodes costs ~2 AR steps here); 12:43 UTC the same
# day with the head's answer n-gram table, budgets 4, 8, 16 x lookup 0, all x table on, off: N=4 with all
# and the table 1.47x AR, the fastest (without the table 1.43x; N=8 with all 1.38x either way); 15:55 UTC the
# same day with each row taking the branch nodes its source earns (lookup.branch_nodes), budgets 4, 6, 8, 16 x
# lookup 0, all: N=8 with all 1.58x AR (tau 2.21) and N=6 with all 1.58x (tau 2.07), tied for the fastest,
# then N=4 with all 1.51x (tau 1.88): N=8, whose tau the docs report (2026-12-08 01:59 UTC, stage-15 head,
# docs/bench/stage15: N=8 and N=4 with all 1.57x each, so it stays). On a GPU verifying
# N tokens costs about one token's forward up to large N, hence 32 there (no GPU measurement yet, and
# lookup stays off on GPU until one).
DEFAULT_BUDGET = {"cpu": 8, "gpu": 32}
DEFAULT_LOOKUP = {"cpu": "all", "gpu": 0}
# bf16 matmuls are 10-20x slower than f32 on XLA:CPU (DESIGN.md section 6); GPUs read half the bytes.
DEFAULT_DTYPE = {"cpu": "float32", "gpu": "bfloat16"}


def _lookup_option(text):
    from jetspec_jax.tree import parse_lookup

    try:
        return parse_lookup(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _platform() -> str:
    import jax

    return "gpu" if jax.default_backend() == "gpu" else "cpu"


def resolved_dtype(name: str) -> str:
    """--dtype value -> the dtype used ("auto" follows the backend)."""
    return DEFAULT_DTYPE[_platform()] if name == "auto" else name


def default_budget() -> int:
    return DEFAULT_BUDGET[_platform()]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m jetspec_jax.generate", description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="?", help="prompt text (chat template applied); or use --input")
    p.add_argument("--model", default="smollm2-135m",
                   help="registered name, HF directory, .gguf file, or Hugging Face id Org/Name[@revision] "
                        "(read from the HF cache, else downloaded; default: smollm2-135m)")
    p.add_argument("--draft", default=None,
                   help="draft head directory or Hugging Face id Org/Name[@revision], or 'none' "
                        "(default: the head shipped for the model)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="ar, chain or tree (default: tree with a draft head, else ar)")
    p.add_argument("--budget", type=int, default=None,
                   help="tree nodes per round N, root included (default: %d on CPU, %d on GPU)"
                        % (DEFAULT_BUDGET["cpu"], DEFAULT_BUDGET["gpu"]))
    p.add_argument("--width", type=int, default=None, help="tree width W (top-W per depth)")
    p.add_argument("--depth", type=int, default=None, help="tree depth D (<= block size - 1)")
    p.add_argument("--lookup", type=_lookup_option, default=None,
                   help="tree nodes given to a prompt-lookup branch (text copied from earlier in the "
                        "prompt or answer) when it finds a match, out of the budget; 'all': every "
                        "node but the root; 0: off (default: %s on CPU, %s on GPU)"
                        % (DEFAULT_LOOKUP["cpu"], DEFAULT_LOOKUP["gpu"]))
    p.add_argument("--no-ngrams", action="store_true",
                   help="rows whose text has no match leave the lookup branch to the head instead of "
                        "the answer n-gram table shipped with the head (ngrams.safetensors)")
    p.add_argument("--tree-kind", choices=("best_first", "top2gap"), default="best_first",
                   help="best_first: the N-1 most likely nodes; top2gap: fan-out shrinks where the "
                        "draft is confident")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights and activations (attention and softmax accumulate in float32); "
                        "auto: %s on CPU, %s on GPU" % (DEFAULT_DTYPE["cpu"], DEFAULT_DTYPE["gpu"]))
    p.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (--input)")
    p.add_argument("--mesh", default=None,
                   help="device mesh, e.g. dp=2,tp=4: dp splits the batch, tp the attention heads "
                        "and MLP width (default: one device)")
    p.add_argument("--coordinator", default=None,
                   help="HOST:PORT of process 0 for a multi-process run (env JETSPEC_COORDINATOR)")
    p.add_argument("--num-processes", type=int, default=None,
                   help="processes in a multi-process run (env JETSPEC_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None,
                   help="this process's index, 0..N-1 (env JETSPEC_PROCESS_ID)")
    p.add_argument("--input", default=None, help="JSONL with prompt / messages / prompt_ids lines")
    p.add_argument("--output", default=None, help="JSONL results (default: stream text to stdout)")
    return p


def read_requests(args, tokenizer) -> list:
    """Token-id prompts from the positional prompt or the --input JSONL."""
    if (args.prompt is None) == (args.input is None):
        raise UserError("give exactly one of a PROMPT argument or --input FILE")
    if args.prompt is not None:
        return [encode_request({"prompt": args.prompt}, tokenizer, "the prompt")]
    try:
        with open(args.input, encoding="utf-8") as f:
            lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read --input {args.input}: {e.strerror}") from None
    if not lines:
        raise UserError(f"--input {args.input} holds no requests")
    requests = []
    for i, line in lines:
        where = f"{args.input} line {i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: malformed JSON ({e.msg})") from None
        requests.append(encode_request(obj, tokenizer, where))
    return requests


def encode_request(obj, tokenizer, where) -> list:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object")
    if "prompt_ids" in obj:
        ids = obj["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise UserError(f"{where}: prompt_ids must be a list of integers")
        if not ids:
            raise UserError(f"{where}: empty prompt")
        return ids
    if "messages" not in obj and "prompt" not in obj:
        raise UserError(f"{where}: expected one of prompt, messages or prompt_ids")
    if tokenizer is None:
        raise UserError(f"{where}: this model has no tokenizer; give prompt_ids")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise UserError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise UserError(f"{where}: empty prompt")
        messages = [{"role": "user", "content": obj["prompt"]}]
    return tokenizer.apply_chat_template(messages)


def decode_config(args, model, head):
    """The static DecodeConfig the options describe."""
    from jetspec_jax.step import DecodeConfig
    from jetspec_jax.tree import TreeConfig, lookup_nodes

    mode = args.mode or ("tree" if head is not None else "ar")
    sample = args.temperature > 0
    if mode == "ar":
        return DecodeConfig(target=model.config, sample=sample)
    if head is None:
        raise UserError(f"--mode {mode} needs a draft head: pass --draft DIR "
                        f"(no head is registered for {args.model})")
    head_cfg, _ = head
    depth = args.depth if args.depth is not None else head_cfg.block_size - 1
    if not 1 <= depth <= head_cfg.block_size - 1:
        raise UserError(f"--depth must be in [1, {head_cfg.block_size - 1}] for this head")
    lookup = args.lookup if args.lookup is not None else DEFAULT_LOOKUP[_platform()]
    try:
        if mode == "chain":  # the head's own chain: the measured lookup default is for trees
            lookup = 0 if args.lookup is None else lookup_nodes(lookup, depth + 1, depth)
            tree = TreeConfig(budget=depth + 1, width=1, depth=depth, kind="chain", lookup=lookup)
        else:
            budget = args.budget if args.budget is not None else default_budget()
            width = args.width if args.width is not None else 4
            lookup = lookup_nodes(lookup, budget, depth)
            lookup = min(lookup, budget - 1, depth) if args.lookup is None else lookup  # a default never errors
            tree = TreeConfig(budget=budget, width=width, depth=depth,
                              kind=args.tree_kind, lookup=lookup)
    except ValueError as e:
        raise UserError(str(e)) from None
    return DecodeConfig(target=model.config, head=head_cfg, tree=tree, sample=sample)


def default_head_path(model_spec):
    """The head shipped for a registered model, if any."""
    from jetspec_jax.loading.registry import REGISTRY, shipped_head_dir

    entry = REGISTRY.get(str(model_spec))
    if entry is None or entry.default_head is None:
        return None
    return str(shipped_head_dir(entry.default_head))


def load_head(args, model):
    """(HeadConfig, params) of the requested head, or None."""
    from jetspec_jax.head import check_head_fits
    from jetspec_jax.loading.head_io import load_head_dir
    from jetspec_jax.loading.hub import local_or_snapshot
    from jetspec_jax.ngrams import without_ngrams

    path = args.draft
    if path is None:
        path = default_head_path(args.model)
    if path is None or path == "none":
        return None
    cfg, params = load_head_dir(local_or_snapshot(path, "draft head"), dtype=args.dtype)
    check_head_fits(cfg, model.config)
    if args.no_ngrams:
        cfg, params = without_ngrams(cfg, params)
    return cfg, params


def enable_compilation_cache() -> None:
    """Keep compiled programs between runs under `$JETSPEC_CACHE/xla` (JAX's persistent
    compilation cache) and their lowered form under `$JETSPEC_CACHE/programs` (program_cache.py),
    so a second run with the same shapes neither traces, lowers nor compiles the model.
    JETSPEC_COMPILATION_CACHE=0 turns both off; a cache dir set through JAX's own config wins."""
    import jax

    from jetspec_jax import program_cache
    from jetspec_jax.loading.registry import cache_dir

    if os.environ.get("JETSPEC_COMPILATION_CACHE", "1") == "0":
        return
    program_cache.enable(cache_dir() / "programs")
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", os.fspath(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # every program of a run


def check_output(path: str) -> None:
    """Fail before loading anything when --output cannot be written (the file is left as it is)."""
    target = Path(path)
    parent = target.parent
    if target.is_dir():
        raise UserError(f"cannot write --output {path}: it is a directory")
    if not parent.is_dir():
        raise UserError(f"cannot write --output {path}: no directory {parent}")
    if not os.access(target if target.exists() else parent, os.W_OK):
        raise UserError(f"cannot write --output {path}: permission denied")


def open_output(path: str):
    """The --output file, opened for writing; a path that cannot be written is a UserError."""
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write --output {path}: {e.strerror or e}") from None


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    from jetspec_jax.sampling import validate_sampling

    validate_sampling(args.temperature, args.top_k, args.top_p)  # before the minutes of loading
    if args.output:
        check_output(args.output)
    from jetspec_jax.sharding import make_mesh, parse_mesh

    mesh_sizes = parse_mesh(args.mesh) if args.mesh is not None else None  # bad syntax fails early
    processes = init_distributed(args)
    if processes > 1 and mesh_sizes is None:
        raise UserError("a multi-process run needs --mesh (e.g. --mesh dp=2 over two processes)")
    mesh = make_mesh(mesh_sizes) if mesh_sizes is not None else None
    args.dtype = resolved_dtype(args.dtype)
    enable_compilation_cache()
    import jax

    from jetspec_jax.loading import load_model
    from jetspec_jax.runner import Runner

    t_load = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype, mesh=mesh)
    requests = read_requests(args, model.tokenizer)
    head = load_head(args, model)
    load_seconds = time.perf_counter() - t_load
    config = decode_config(args, model, head)
    params = {"target": model.params}
    if head is not None and config.head is not None:
        params["head"] = head[1]
    runner = Runner(params, config, model.tokenizer, mesh=mesh)
    writer = jax.process_index() == 0  # every process decodes; the first one reports
    out = open_output(args.output) if args.output and writer else None
    try:
        for lo in range(0, len(requests), args.batch_size):
            batch = requests[lo: lo + args.batch_size]
            stream = None
            if out is None and writer and len(batch) == 1 and model.tokenizer is not None:
                stream = lambda _, text: (sys.stdout.write(text), sys.stdout.flush())  # noqa: E731
            rows = runner.run(batch, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed, stop_ids=model.eos_ids, stop_strings=args.stop,
                              on_text=stream)
            for row in rows:
                if not writer:
                    continue
                if out is not None:
                    out.write(json.dumps({"ids": row.ids, "text": row.text, "stats": row.stats}) + "\n")
                    out.flush()
                else:
                    if stream is None:
                        sys.stdout.write(row.text if row.text is not None else json.dumps(row.ids))
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                    s = row.stats
                    tau = s["new_tokens"] / max(1, s["rounds"])
                    print(f"[{config_name(config)}] {s['new_tokens']} tokens, tau {tau:.2f} tokens/round "
                          f"({s['rounds']} rounds); decoding {s['decode_seconds']:.2f}s = "
                          f"{s['decode_tokens_per_second']} tok/s; with prefill {s['seconds']:.2f}s = "
                          f"{s['tokens_per_second']} tok/s; load {load_seconds:.2f}s, compile "
                          f"{runner.compile_seconds:.2f}s", file=sys.stderr)
    finally:
        if out is not None:
            out.close()
    return 0


def _setting(value, env: str, convert=int):
    """An option's value, else its environment variable's, converted (int unless told otherwise)."""
    if value is not None or env not in os.environ:
        return value
    raw = os.environ[env]
    try:
        return convert(raw)
    except ValueError:
        raise UserError(f"{env}={raw!r} is not a whole number") from None


def init_distributed(args) -> int:
    """Join a multi-process run (jax.distributed) before any device is used -> process count."""
    coordinator = _setting(args.coordinator, "JETSPEC_COORDINATOR", str)
    num = _setting(args.num_processes, "JETSPEC_NUM_PROCESSES")
    pid = _setting(args.process_id, "JETSPEC_PROCESS_ID")
    if coordinator is None and num is None and pid is None:
        return 1
    if coordinator is None or num is None or pid is None:
        raise UserError("a multi-process run needs all of --coordinator HOST:PORT, "
                        "--num-processes N and --process-id I")
    if num < 1 or not 0 <= pid < num:
        raise UserError(f"--process-id must be in [0, {num}) and --num-processes >= 1")
    if ":" not in coordinator:
        raise UserError(f"--coordinator {coordinator!r} must be HOST:PORT")
    import jax

    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot join the run at {coordinator}: {first}") from None
    return num


def config_name(config) -> str:
    if config.tree is None:
        return "ar"
    t = config.tree
    lookup = f" lookup={t.lookup}" if t.lookup else ""
    lookup += "+ngrams" if t.lookup and config.head.ngram_orders else ""
    return f"{t.kind} N={t.budget} W={t.width} D={config.depth}{lookup}"  # the depth a round can reach


def main(argv=None) -> int:
    try:
        return run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
