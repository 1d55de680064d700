"""The table of GPU programs in docs/gpu.md: Qwen3-8B prefill and decoding loop lowered for CUDA on
this machine (no GPU needed), per batch size, tree budget and mesh.

    python scripts/lower_gpu.py                 # rewrites the table between the markers in docs/gpu.md
    python scripts/lower_gpu.py --print         # prints it instead

Mesh rows need 8 devices; without them this script re-runs itself with 8 forced host devices.
tests/test_gpu_lowering.py asserts the same facts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

BEGIN, END = "<!-- lowering table: scripts/lower_gpu.py -->", "<!-- end of lowering table -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "gpu.md"


def rows():
    from jetspec_jax.lowering import inspect_module, lower_decode, lower_prefill, qwen3_8b_config
    from jetspec_jax.sharding import make_mesh

    cases = [(None, b, n) for b in (1, 8) for n in (16, 64, 256)] + [("tp=8", 1, 64), ("dp=2,tp=4", 8, 64)]
    for spec, batch, budget in cases:
        mesh = None if spec is None else make_mesh(spec)
        config = qwen3_8b_config(budget)
        programs = [("decode loop", lower_decode(config, batch=batch, capacity=8192, mesh=mesh))]
        if budget == 64:
            programs.append(("prefill 1024", lower_prefill(config, batch=batch, prompt_len=1024, capacity=8192, mesh=mesh)))
        for what, module in programs:
            r = inspect_module(module)
            for call in r.triton:
                q, k = call.operands[2], call.operands[3]
                yield (spec or "1 device", what, batch, budget, "x".join(map(str, q)), "x".join(map(str, k)),
                       "x".join(map(str, call.grid)), call.programs, call.calls, r.whiles, r.loop_body_conditionals,
                       r.host_callbacks)


def table() -> str:
    head = ("| devices | program | B | N | kernel q rows (B, Hkv, rows, D) | K per call | grid | programs "
            "| launches | while loops | loop-body conditionals | host callbacks |")
    lines = [head, "|" + "---|" * 12]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="print the table instead of updating docs/gpu.md")
    args = ap.parse_args(argv)
    import jax

    if jax.device_count() < 8:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
        return subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env)
    text = table()
    if args.print:
        print(text)
        return 0
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        print(f"error: {DOC} lacks the markers {BEGIN} ... {END}", file=sys.stderr)
        return 2
    before, rest = doc.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    DOC.write_text(f"{before}{BEGIN}\n{text}\n{END}{after}")
    print(f"wrote the table ({text.count(chr(10)) - 1} rows) into {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
