"""Lossless greedy through the command line: tiny HF Qwen3 targets with random heads written by
the `dflash` package, and SmolLM2-135M with a random head, emit exactly the target's own ids."""

import jax
import pytest
import torch
from dflash.model import DFlashDraftModel
from transformers import Qwen3Config

from jetspec_jax.cli import main
from jetspec_jax.head import HeadConfig, init_head_params
from jetspec_jax.loading.head_io import save_head_dir
from test_generate_cli import PROMPTS, hf_greedy, run_cli

MAX_NEW = 20


def dflash_head(path, *, hidden, vocab, target_layers, causal, seed):
    """A random JetSpec/DFlash head saved by the reference package itself."""
    config = Qwen3Config(
        hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=96, vocab_size=vocab, rms_norm_eps=1e-6,
        num_target_layers=target_layers, block_size=8, is_causal=causal,
        dflash_config={"target_layer_ids": [0, 1], "mask_token_id": vocab - 1, "causal_head": causal})
    torch.manual_seed(seed)
    model = DFlashDraftModel(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.ndim > 1 else p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen3_target(make_tiny_hf):
    path = make_tiny_hf("qwen3")
    return path, [hf_greedy(path, p, MAX_NEW) for p in PROMPTS]


@pytest.fixture(scope="module", params=[True, False], ids=["causal", "bidirectional"])
def head_dir(request, tmp_path_factory):
    return dflash_head(tmp_path_factory.mktemp("head") / "head", hidden=64, vocab=160,
                       target_layers=2, causal=request.param, seed=int(request.param))


MODES = [
    (["--mode", "chain", "--depth", "1"], 3),  # budget 2
    (["--mode", "chain", "--depth", "7"], 1),
    (["--mode", "tree", "--budget", "7", "--width", "4", "--depth", "3"], 3),
    (["--mode", "tree", "--budget", "33", "--width", "8", "--depth", "7"], 1),
    (["--mode", "tree", "--budget", "64", "--width", "4", "--depth", "7"], 3),
    (["--mode", "tree", "--budget", "16", "--width", "4", "--tree-kind", "top2gap"], 3),
]


@pytest.mark.parametrize("mode,batch", MODES, ids=lambda v: "-".join(v) if isinstance(v, list) else f"b{v}")
def test_speculative_ids_equal_transformers(qwen3_target, head_dir, tmp_path, mode, batch):
    model_dir, expected = qwen3_target
    rows = run_cli(tmp_path, ["--model", str(model_dir), "--draft", str(head_dir), *mode,
                              "--max-new-tokens", str(MAX_NEW), "--batch-size", str(batch)],
                   [{"prompt_ids": p} for p in PROMPTS])
    assert [r["ids"] for r in rows] == expected
    for r in rows:
        assert sum(r["stats"]["accept_lengths"]) == len(r["ids"])


def test_head_that_does_not_fit_is_one_error_line(qwen3_target, tmp_path, capsys):
    model_dir, _ = qwen3_target
    wrong = dflash_head(tmp_path / "wide", hidden=96, vocab=160, target_layers=2, causal=True, seed=3)
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt_ids": [1, 2, 3]}\n')
    capsys.readouterr()
    assert main(["--model", str(model_dir), "--draft", str(wrong), "--input", str(src)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "hidden" in err[0], err


@pytest.mark.real_model
def test_smollm2_with_random_head_equals_ar(smollm2_model, tmp_path):
    cfg = smollm2_model.config
    head_cfg = HeadConfig(hidden_size=cfg.hidden_size, num_layers=1, num_heads=9, num_kv_heads=3,
                          head_dim=64, intermediate_size=1536, vocab_size=cfg.vocab_size,
                          num_target_layers=cfg.num_layers, mask_token_id=0, block_size=16)
    head = tmp_path / "smol-head"
    save_head_dir(head, head_cfg, init_head_params(head_cfg, jax.random.PRNGKey(0)))
    request = [{"messages": [{"role": "user", "content": "Name the planets of the solar system."}]}]
    ar = run_cli(tmp_path, ["--model", "smollm2-135m", "--mode", "ar", "--max-new-tokens", "48"], request)
    tree = run_cli(tmp_path, ["--model", "smollm2-135m", "--draft", str(head), "--mode", "tree",
                              "--budget", "16", "--width", "4", "--max-new-tokens", "48"], request)
    assert tree[0]["ids"] == ar[0]["ids"] and len(ar[0]["ids"]) == 48
