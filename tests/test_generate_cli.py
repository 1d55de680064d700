"""The command line against HF transformers: greedy ids identical, single and ragged batches."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jetspec_jax.cli import main
from jetspec_jax.errors import UserError

FAMILIES = ["qwen3", "qwen2", "llama"]
PROMPTS = [[3, 17, 42, 99, 5], [120, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27]]


def hf_greedy(model_dir, prompt, max_new):
    """transformers' own greedy decoding of one prompt (float32, no padding)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def run_cli(tmp_path, args, requests):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in requests))
    assert main([*args, "--input", str(src), "--output", str(dst)]) == 0
    return [json.loads(line) for line in dst.read_text().splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_ids_equal_transformers(tiny_hf_models, tmp_path, family, batch_size):
    model_dir = tiny_hf_models[family]
    rows = run_cli(tmp_path, ["--model", str(model_dir), "--max-new-tokens", "20",
                              "--batch-size", str(batch_size)], [{"prompt_ids": p} for p in PROMPTS])
    assert len(rows) == len(PROMPTS)
    for prompt, row in zip(PROMPTS, rows):
        expected = hf_greedy(model_dir, prompt, 20)
        assert row["ids"] == expected[: len(row["ids"])]
        assert len(row["ids"]) == len(expected)  # same stopping point (EOS or the limit)
        stats = row["stats"]
        assert stats["new_tokens"] == len(row["ids"]) and stats["rounds"] == len(stats["accept_lengths"])
        assert row["text"] is None  # a bare HF directory has no tokenizer


@pytest.mark.real_model
def test_smollm2_greedy_equals_transformers_gguf(smollm2_gguf, smollm2_model, tmp_path):
    import torch
    import transformers

    messages = [[{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
                [{"role": "system", "content": "You are a terse assistant."},
                 {"role": "user", "content": "List three prime numbers and add them up."}]]
    rows = run_cli(tmp_path, ["--model", "smollm2-135m", "--max-new-tokens", "56"],
                   [{"messages": m} for m in messages])
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, torch_dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for m, row in zip(messages, rows):
        ids = tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ids == smollm2_model.tokenizer.apply_chat_template(m)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=56, do_sample=False,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              eos_token_id=list(smollm2_model.eos_ids))
        expected = out[0, len(ids):].tolist()
        assert row["ids"] == expected
        assert len(row["ids"]) >= 48 or row["ids"][-1] in smollm2_model.eos_ids
        assert row["text"] == smollm2_model.tokenizer.decode(row["ids"])


BAD_INPUTS = [
    (["--model", "/nonexistent/model-dir"], None, "error: "),
    (["--max-new-tokens", "0"], [{"prompt_ids": [1, 2]}], "max-new-tokens"),
    (["--temperature", "-1"], [{"prompt_ids": [1, 2]}], "temperature"),
    (["--top-p", "0"], [{"prompt_ids": [1, 2]}], "top-p"),
    (["--top-p", "1.5"], [{"prompt_ids": [1, 2]}], "top-p"),
    ([], [{"prompt_ids": []}], "empty prompt"),
    ([], [{"prompt_ids": [1, 999999]}], "outside the vocabulary"),
    ([], "not json\n", "malformed JSON"),
    ([], [{"nothing": 1}], "expected one of"),
    (["--max-new-tokens", "100000"], [{"prompt_ids": [1, 2]}], "exceeds"),
    (["--mode", "tree"], [{"prompt_ids": [1, 2]}], "needs a draft head"),
    (["--mode", "sideways"], [{"prompt_ids": [1, 2]}], "invalid choice"),
    (["--output", "/nonexistent-dir/out.jsonl"], [{"prompt_ids": [1, 2]}], "cannot write --output"),
    (["--output", "/"], [{"prompt_ids": [1, 2]}], "it is a directory"),
]


@pytest.mark.parametrize("args,requests,message", BAD_INPUTS)
def test_bad_input_is_one_error_line(tiny_hf_models, tmp_path, capsys, args, requests, message):
    argv = list(args)
    if "--model" not in argv:
        argv = ["--model", str(tiny_hf_models["llama"]), *argv]
    if requests is not None:
        src = tmp_path / "in.jsonl"
        src.write_text(requests if isinstance(requests, str) else
                       "".join(json.dumps(r) + "\n" for r in requests))
        argv += ["--input", str(src)]
    else:
        argv += ["hello"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_truncated_model_file_exits_2_without_traceback(tmp_path, smollm2_gguf):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(smollm2_gguf.read_bytes()[: 5_000_000])
    proc = subprocess.run([sys.executable, "-m", "jetspec_jax.generate", "hi", "--model", str(broken)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_compilation_cache_makes_the_second_run_compile_nothing(tiny_hf_models, tmp_path):
    """Run 1 compiles prefill and the loop into $JETSPEC_CACHE/xla (and their lowered form into
    $JETSPEC_CACHE/programs); run 2 (a new process) loads them from there; JETSPEC_COMPILATION_CACHE=0
    keeps both off."""
    env = dict(os.environ, JETSPEC_CACHE=str(tmp_path / "cache"), JAX_LOG_COMPILES="1", JAX_PLATFORMS="cpu")
    env.pop("JETSPEC_COMPILATION_CACHE")
    argv = [sys.executable, "-m", "jetspec_jax.generate", "--model", str(tiny_hf_models["qwen3"]),
            "--max-new-tokens", "8", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt_ids": [3, 5, 7]}) + "\n")
    runs = [subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    hit = "Persistent compilation cache hit for 'jit_decode'"
    assert hit not in runs[0].stderr and hit in runs[1].stderr
    assert "Persistent compilation cache hit for 'jit_prefill'" in runs[1].stderr
    assert list((tmp_path / "cache" / "xla").glob("jit_decode-*"))
    # The lowered programs too (program_cache.py): run 2 read them, it did not write new ones.
    programs = sorted((tmp_path / "cache" / "programs").glob("*.bin"))
    assert [p.name.split("-")[0] for p in programs] == ["decode", "prefill"]
    written = {p: p.stat().st_ino for p in programs}  # an entry is replaced by a rename: a new inode
    runs.append(subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300))
    assert runs[-1].returncode == 0 and {p: p.stat().st_ino for p in programs} == written
    assert "Persistent compilation cache hit for 'jit_decode'" in runs[-1].stderr
    off = dict(env, JETSPEC_COMPILATION_CACHE="0", JETSPEC_CACHE=str(tmp_path / "off"))
    assert subprocess.run(argv, env=off, capture_output=True, text=True, timeout=300).returncode == 0
    assert not (tmp_path / "off" / "xla").exists() and not (tmp_path / "off" / "programs").exists()


def test_default_tree_budget_follows_the_backend():
    """Without --budget the tree has the budget measured fastest for the backend (CPU here)."""
    import types

    from jetspec_jax.cli import DEFAULT_BUDGET, DEFAULT_LOOKUP, build_parser, decode_config
    from jetspec_jax.config import ModelConfig
    from jetspec_jax.head import HeadConfig

    target = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, intermediate_size=64)
    head = HeadConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=64, vocab_size=64, num_target_layers=2, mask_token_id=63)
    model = types.SimpleNamespace(config=target)
    config = decode_config(build_parser().parse_args(["hi"]), model, (head, None))
    assert config.tree.budget == DEFAULT_BUDGET["cpu"] == 8 and config.tree.width == 4
    assert DEFAULT_LOOKUP["cpu"] == "all" and config.tree.lookup == 7  # up to every node but the root
    config = decode_config(build_parser().parse_args(["hi", "--budget", "9"]), model, (head, None))
    assert config.tree.budget == 9
    # the default lookup shrinks to fit a small tree; an explicit one that does not fit is an error
    assert decode_config(build_parser().parse_args(["hi", "--budget", "2"]), model, (head, None)).tree.lookup == 1
    assert decode_config(build_parser().parse_args(["hi", "--lookup", "0"]), model, (head, None)).tree.lookup == 0
    chain = decode_config(build_parser().parse_args(["hi", "--mode", "chain", "--depth", "1"]), model, (head, None))
    assert chain.tree.kind == "chain" and chain.tree.lookup == 0  # a chain drafts with the head alone
    with pytest.raises(UserError, match="lookup 8 must be below the budget 8"):
        decode_config(build_parser().parse_args(["hi", "--lookup", "8"]), model, (head, None))
    # 'all': every node but the root, as deep as the head drafts (this head: block 16, depth 15)
    every = decode_config(build_parser().parse_args(["hi", "--budget", "8", "--lookup", "all"]), model, (head, None))
    assert every.tree.budget == 8 and every.tree.lookup == 7
    deep = decode_config(build_parser().parse_args(["hi", "--budget", "32", "--lookup", "all"]), model, (head, None))
    assert deep.tree.lookup == head.block_size - 1 == 15
    with pytest.raises(UserError, match="non-negative integer or 'all'"):
        build_parser().parse_args(["hi", "--lookup", "most"])
    from jetspec_jax.cli import resolved_dtype

    assert build_parser().parse_args(["hi"]).dtype == "auto"
    assert resolved_dtype("auto") == "float32" and resolved_dtype("bfloat16") == "bfloat16"  # CPU here
    for bad in (["--budget", "0"], ["--width", "0"]):  # zero is an error, not "use the default"
        with pytest.raises(UserError, match="must be an integer >= 1"):
            decode_config(build_parser().parse_args(["hi", *bad]), model, (head, None))


def test_help_does_not_import_jax():
    """`--help` answers at once: neither the package nor the CLI's parser imports JAX (seconds on a
    small CPU); the public names still resolve on first use."""
    code = ("import runpy, sys\n"
            "sys.argv = ['generate', '--help']\n"
            "try:\n"
            "    runpy.run_module('jetspec_jax.generate', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "assert 'jax' not in sys.modules, 'jax was imported'\n"
            "from jetspec_jax import DecodeConfig, generate, speculative_step\n"
            "assert 'jax' in sys.modules and callable(generate) and callable(speculative_step)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--max-new-tokens" in proc.stdout
