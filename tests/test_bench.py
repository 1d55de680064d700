"""The benchmark harness end to end on a tiny random Qwen3 target with a random head: every mode,
both peers, equality with greedy AR, no compilation in the timed part, and all three outputs."""

import json

import jax
import pytest

from jetspec_jax.bench import main
from jetspec_jax.head import HeadConfig, init_head_params
from jetspec_jax.loading.head_io import save_head_dir

PROMPTS = [[3, 17, 42, 99, 5], [120, 7, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
MAX_NEW = 12


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """--torch-threads sets a process-wide torch setting; give other tests theirs back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target_and_head(make_tiny_hf, tmp_path_factory):
    target = make_tiny_hf("qwen3")
    head_cfg = HeadConfig(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                          intermediate_size=96, vocab_size=160, num_target_layers=2,
                          mask_token_id=159, block_size=6, target_layer_ids=(0, 1))
    head = tmp_path_factory.mktemp("bench") / "head"
    save_head_dir(head, head_cfg, init_head_params(head_cfg, jax.random.PRNGKey(0)))
    return target, head


def _prompt_file(path):
    lines = [{"prompt_ids": p, "set": "a" if i < 2 else "b"} for i, p in enumerate(PROMPTS)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_sweep_with_peers(target_and_head, tmp_path, capsys):
    target, head = target_and_head
    out = tmp_path / "out"
    code = main(["--model", str(target), "--draft", str(head), "--prompt-ids-file",
                 str(_prompt_file(tmp_path / "p.jsonl")), "--max-new-tokens", str(MAX_NEW),
                 "--budgets", "1,5", "--width", "2", "--peers", "hf,dflash", "--torch-threads", "1",
                 "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert (out / "bench.png").stat().st_size > 0 and "## Speed-up" in (out / "report.md").read_text()
    assert "## Equality with greedy AR" in stdout

    labels = {(r["set"], r["label"]) for r in report["runs"]}
    assert labels == {(s, lab) for s in "ab" for lab in ("ar", "chain", "tree N=5", "hf", "dflash")}
    assert report["equality"] == {"checked": 2 * len(PROMPTS), "mismatches": [], "ok": True}
    assert report["compiles"]["timed"] == 0 and report["compiles"]["split_timed"] == 0
    assert report["compiles"]["warmup"] > 0  # the counter does count
    # The tiny HF target run by transformers gives the same greedy ids as ours (float32).
    assert report["peer_agreement"]["hf"] == {"checked": len(PROMPTS), "equal": len(PROMPTS)}
    assert report["peer_agreement"]["dflash"] == {"checked": len(PROMPTS), "equal": len(PROMPTS)}

    for run in report["runs"]:
        assert run["tokens_per_second"] > 0 and run["tau"] >= 1
        for row in run["prompts"]:
            assert 1 <= row["new_tokens"] <= MAX_NEW and row["rounds"] >= 1
        if run["engine"] == "jetspec":
            assert run["compiles_timed"] == 0 and run["decode_tokens_per_second"] > 0
            assert run["equal_to_ar"] is (None if run["mode"] == "ar" else True)
            assert sum(r["rounds"] for r in run["prompts"]) == run["rounds"]
    chain = next(r for r in report["pooled"] if r["label"] == "chain")
    assert (chain["budget"], chain["width"], chain["depth"]) == (6, 1, 5)

    for run in report["pooled"]:
        if run["engine"] != "jetspec":
            assert "split" not in run
            continue
        split = run["split"]
        assert split["ids_match_fused"] and split["compiles_timed"] == 0 and split["rounds"] > 0
        ms = split["ms_per_round"]
        assert (ms["draft"] == 0) == (run["mode"] == "ar") and ms["verify"] > 0 and ms["commit"] > 0
        assert 0 < split["overhead_pct"] < 100
        assert split["fused_round_ms"] > 0
    table = report["speedup"]["all"]
    assert len(table["labels"]) == 5
    assert all(table["ratio"][i][i] == 1.0 for i in range(5))


def test_without_a_head_only_ar_runs(target_and_head, tmp_path, capsys):
    target, _ = target_and_head
    out = tmp_path / "out"
    code = main(["--model", str(target), "--prompt-ids-file", str(_prompt_file(tmp_path / "p.jsonl")),
                 "--num-prompts", "1", "--max-new-tokens", "4", "--peers", "none",
                 "--split-prompts", "0", "--out", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "no draft head" in err and "--draft" in err
    report = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["ar", "ar"]
    assert report["equality"]["checked"] == 0 and (out / "report.md").is_file()


@pytest.mark.parametrize("args,message", [
    (["--budgets", "1,x"], "comma-separated integers"),
    (["--peers", "vllm"], "unknown 'vllm'"),
    (["--modes", "chain", "--budgets", "8"], "leaves nothing to run"),
    (["--prompt-ids-file", "/nonexistent.jsonl"], "cannot read --prompt-ids-file"),
    (["--lookup", "2,most"], "non-negative integer or 'all'"),
])
def test_bad_options_are_one_error_line(target_and_head, tmp_path, capsys, args, message):
    target, head = target_and_head
    assert main(["--model", str(target), "--draft", str(head), "--peers", "none",
                 "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_speculative_output_that_differs_from_ar_fails_the_run(target_and_head, tmp_path, capsys,
                                                                 monkeypatch):
    """Negative control, through the injectable prompt list: corrupt the chain's last token."""
    from jetspec_jax.bench import run
    from jetspec_jax.benchmark.measure import FusedRunner

    real_run = FusedRunner.run

    def corrupted(self, ids, config, repeats=1):
        timed = real_run(self, ids, config, repeats)
        if config.tree is not None:
            timed.ids = timed.ids[:-1] + [(timed.ids[-1] + 1) % 160]
        return timed

    monkeypatch.setattr(FusedRunner, "run", corrupted)
    target, head = target_and_head
    code = run(["--model", str(target), "--draft", str(head), "--max-new-tokens", str(MAX_NEW),
                "--budgets", "1", "--peers", "none", "--split-prompts", "0", "--out", str(tmp_path / "o")],
               prompt_sets={"x": PROMPTS[:1]})
    assert code == 1
    assert "MISMATCH: x prompt 0 chain: first difference at token" in capsys.readouterr().err
    report = json.loads((tmp_path / "o" / "results.json").read_text())
    assert not report["equality"]["ok"] and report["equality"]["mismatches"][0]["config"] == "chain"


def test_batch_sizes(target_and_head, tmp_path):
    """--batch-sizes 1,2 on 3 prompts: groups [0, 1] and [2 + its padding copy], ids equal to AR."""
    from jetspec_jax.bench import run

    target, head = target_and_head
    out = tmp_path / "o"
    code = run(["--model", str(target), "--draft", str(head), "--max-new-tokens", str(MAX_NEW),
                "--budgets", "1,5", "--width", "2", "--peers", "none", "--split-prompts", "0",
                "--batch-sizes", "1,2", "--out", str(out)], prompt_sets={"x": PROMPTS})
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert report["equality"]["mismatches"] == [] and report["compiles"]["timed"] == 0
    batched = {(r["set"], r["label"]): r for r in report["batched"]}
    assert set(batched) == {(s, lab) for s in ("x", "all") for lab in ("ar", "chain", "tree N=5")}
    for (name, label), run_ in batched.items():
        one = next(r for r in report["runs"] if r["set"] == "x" and r["label"] == label)
        assert run_["batch_size"] == 2 and run_["equal_to_ar"] is True
        assert [g["indices"] for g in run_["prompts"]] == [[0, 1], [2]]
        assert run_["new_tokens"] == one["new_tokens"] and run_["rounds"] == one["rounds"]
        assert run_["tau"] == one["tau"] and run_["compiles_timed"] == 0
        assert run_["vs_batch_1"] == round(run_["tokens_per_second"] / one["tokens_per_second"], 3)
    md = (out / "report.md").read_text()
    assert "## Batch size" in md and "| chain |" in md.split("## Batch size")[1]


def test_lookup_all_takes_every_node_but_the_root():
    """'all' resolves per budget (N-1, at most the head's depth) and a count it repeats runs once."""
    from jetspec_jax.bench import build_parser, sweep_configs
    from jetspec_jax.config import ModelConfig
    from jetspec_jax.head import HeadConfig

    target = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, intermediate_size=64)
    head = HeadConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=64, vocab_size=64, num_target_layers=2, mask_token_id=63, block_size=8)
    args = build_parser().parse_args(["--budgets", "4,16", "--lookup", "3,all", "--modes", "ar,tree"])
    got = [(label, config.tree.lookup) for label, _, _, config in sweep_configs(args, target, head)[1:]]
    assert got == [("tree N=4 lookup=3", 3), ("tree N=16 lookup=3", 3), ("tree N=16 lookup=7", 7)]


def test_ngrams_axis_only_where_a_table_and_a_lookup_branch_are():
    from jetspec_jax.bench import build_parser, sweep_configs
    from jetspec_jax.config import ModelConfig
    from jetspec_jax.head import HeadConfig

    target = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, intermediate_size=64)
    head = HeadConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                      vocab_size=64, num_target_layers=2, mask_token_id=63, block_size=8, ngram_orders=(4, 8))
    args = build_parser().parse_args(["--budgets", "4", "--lookup", "0,all", "--modes", "ar,tree", "--ngrams", "on,off"])
    got = [(label, config.head.ngram_orders) for label, _, _, config in sweep_configs(args, target, head)[1:]]
    assert got == [("tree N=4", (4, 8)), ("tree N=4 lookup=3", (4, 8)), ("tree N=4 lookup=3 ngrams=off", ())]
    bare = head.replace(ngram_orders=())  # no table: no axis
    assert len(sweep_configs(args, target, bare)) == 3
