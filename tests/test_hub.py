"""Hugging Face ids (`--model Org/Name[@revision]`, `--draft Org/Name`) from a cache laid out the
way huggingface_hub lays it out (blobs named by hash, snapshots/<commit>/ of symlinks into
blobs, refs/<name> holding a commit), built by hand here. Nothing here touches the network:
HF_HUB_OFFLINE is on, and the one online test replaces the Hub request with a failing one."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from huggingface_hub import constants

from jetspec_jax.cli import main
from jetspec_jax.errors import UserError
from jetspec_jax.head import HeadConfig, init_head_params
from jetspec_jax.loading import hub, load_model, registry
from jetspec_jax.loading.head_io import load_head_dir, save_head_dir
from jetspec_jax.model import Transformer, init_cache
from test_generate_cli import hf_greedy

COMMIT_A = "a" * 8 + "0123456789abcdef0123456789abcdef"  # 40 hex digits, as the Hub's commit ids
COMMIT_B = "b" * 8 + "0123456789abcdef0123456789abcdef"
PROMPT = [3, 17, 42, 99, 5]


def add_snapshot(cache: Path, repo_id: str, commit: str, folder: Path, refs=()) -> Path:
    """Put the files of `folder` into `cache` as huggingface_hub stores a downloaded snapshot:
    models--Org--Name/blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>
    (relative symlinks), refs/<ref> = the commit (no newline)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def models(make_tiny_hf):
    """Two different tiny Qwen3 directories (a: refs/main, b: refs/v2)."""
    return make_tiny_hf("qwen3"), make_tiny_hf("qwen3")


@pytest.fixture
def cache(tmp_path, monkeypatch, models):
    """$HF_HOME/hub with Org/Tiny: main -> COMMIT_A (model a), v2 -> COMMIT_B (model b). Offline."""
    home = tmp_path / "hf"
    root = home / "hub"
    add_snapshot(root, "Org/Tiny", COMMIT_A, models[0], refs=("main",))
    add_snapshot(root, "Org/Tiny", COMMIT_B, models[1], refs=("v2",))
    monkeypatch.setenv("HF_HOME", str(home))  # for subprocesses; this process reads the constants
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("a test contacted the Hugging Face Hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    return root


def logits(model, ids):
    t = len(ids)
    out, _, _ = Transformer(model.config).apply(
        {"params": model.params}, jnp.asarray([ids], jnp.int32), jnp.arange(t, dtype=jnp.int32)[None],
        init_cache(model.config, 1, t), jnp.tril(jnp.ones((t, t), bool))[None])
    return np.asarray(out[0])


def test_cache_is_laid_out_as_huggingface_hub_reads_it(cache):
    info = huggingface_hub.scan_cache_dir(cache)
    (repo,) = info.repos
    assert repo.repo_id == "Org/Tiny" and repo.repo_type == "model"
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {COMMIT_A: {"main"}, COMMIT_B: {"v2"}}
    found = huggingface_hub.try_to_load_from_cache("Org/Tiny", "config.json", revision="v2")
    assert Path(found) == cache / "models--Org--Tiny" / "snapshots" / COMMIT_B / "config.json"


def test_load_model_hub_id_equals_directory(cache, models):
    from_hub, from_dir = load_model("Org/Tiny"), load_model(models[0])
    assert from_hub.name == "Org/Tiny" and from_hub.config == from_dir.config
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), from_hub.params, from_dir.params))
    np.testing.assert_array_equal(logits(from_hub, PROMPT), logits(from_dir, PROMPT))


def test_revisions_pick_their_snapshot(cache, models):
    snapshots = cache / "models--Org--Tiny" / "snapshots"
    assert registry.resolve_model("Org/Tiny") == snapshots / COMMIT_A  # refs/main
    assert registry.resolve_model("Org/Tiny@main") == snapshots / COMMIT_A
    assert registry.resolve_model("Org/Tiny@v2") == snapshots / COMMIT_B  # another ref
    assert registry.resolve_model(f"Org/Tiny@{COMMIT_B}") == snapshots / COMMIT_B  # a commit
    assert registry.resolve_model(f"Org/Tiny@{COMMIT_A}") == snapshots / COMMIT_A
    b = load_model("Org/Tiny@v2")
    np.testing.assert_array_equal(logits(b, PROMPT), logits(load_model(models[1]), PROMPT))
    with pytest.raises(UserError, match=r"Org/Tiny@v3: .*not in the Hugging Face cache.*"
                                        r"hf download Org/Tiny --revision v3"):
        registry.resolve_model("Org/Tiny@v3")
    with pytest.raises(UserError, match="bad revision"):
        registry.resolve_model("Org/Tiny@")


def test_local_path_and_registered_name_win(cache, models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = Path("Org") / "Tiny"
    local.mkdir(parents=True)
    for f in models[1].iterdir():
        (local / f.name).write_bytes(f.read_bytes())
    assert registry.resolve_model("Org/Tiny") == local
    assert hub.local_or_snapshot("Org/Tiny") == "Org/Tiny"
    monkeypatch.setitem(registry.REGISTRY, "Org/Tiny", registry.REGISTRY["smollm2-135m"])
    monkeypatch.setattr(registry, "fetch_registered", lambda name: Path("/registered") / name)
    assert registry.resolve_model("Org/Tiny") == Path("/registered/Org/Tiny")
    for spec in ("smollm2-135m", "./a/b", "/abs/model", "a/b/c", "~/m"):
        assert not hub.is_hub_id(spec), spec


def test_incomplete_snapshot_is_not_used_offline(cache, models, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((models[0] / "config.json").read_bytes())
    add_snapshot(cache, "Org/Partial", COMMIT_A, config_only, refs=("main",))
    with pytest.raises(UserError, match="Org/Partial: the cached snapshot .* no config.json or complete "
                                        ".safetensors weights; HF_HUB_OFFLINE"):
        registry.resolve_model("Org/Partial")


def test_unknown_id_offline_is_one_error_line(cache, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt_ids": PROMPT}) + "\n")
    capsys.readouterr()
    assert main(["--model", "Org/Missing", "--mode", "ar", "--max-new-tokens", "4", "--input", str(src)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Org/Missing: not a local path"), err
    assert "HF_HUB_OFFLINE" in err[0] and "`hf download Org/Missing`" in err[0] and str(cache) in err[0]


def test_online_miss_fails_with_one_line(cache, monkeypatch):
    """Not offline and not cached: the Hub is asked once, with a timeout; unreachable -> UserError."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def unreachable(self, repo_id, *, revision=None, timeout=None, **kwargs):
        calls.append((repo_id, revision, timeout))
        raise ConnectionError("[Errno -2] Name or service not known")

    def download(*args, local_files_only=False, **kwargs):
        if not local_files_only:
            raise AssertionError("snapshot_download went online after the Hub proved unreachable")
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    with pytest.raises(UserError) as e:
        registry.resolve_model("Org/Missing@v1")
    message = str(e.value)
    assert "\n" not in message and message.startswith("Org/Missing@v1: not a local path")
    assert "cannot be reached (ConnectionError" in message and "hf download Org/Missing --revision v1" in message
    assert calls == [("Org/Missing", "v1", constants.HF_HUB_ETAG_TIMEOUT)]


def test_cli_runs_from_the_cache(cache, models, tmp_path):
    """A separate process: HF_HOME and HF_HUB_OFFLINE=1 from the environment, as a user sets them."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt_ids": PROMPT}) + "\n")
    env = {**os.environ, "JETSPEC_COMPILATION_CACHE": "0", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "jetspec_jax.generate", "--model", "Org/Tiny@v2", "--mode", "ar",
         "--max-new-tokens", "4", "--input", str(src), "--output", str(dst)],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (row,) = [json.loads(line) for line in dst.read_text().splitlines()]
    assert row["ids"] == hf_greedy(models[1], PROMPT, 4)


def test_draft_hub_id(cache, models, tmp_path):
    cfg = HeadConfig(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                     intermediate_size=96, vocab_size=160, num_target_layers=2, mask_token_id=159,
                     block_size=8)
    save_head_dir(tmp_path / "head", cfg, init_head_params(cfg, jax.random.PRNGKey(0)))
    snapshot = add_snapshot(cache, "Org/Head", COMMIT_A, tmp_path / "head", refs=("main",))
    assert hub.local_or_snapshot("Org/Head", "draft head") == snapshot
    assert load_head_dir(hub.local_or_snapshot("Org/Head"))[0] == load_head_dir(tmp_path / "head")[0]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt_ids": PROMPT}) + "\n")
    assert main(["--model", "Org/Tiny", "--draft", "Org/Head", "--mode", "chain", "--depth", "3",
                 "--max-new-tokens", "6", "--input", str(src), "--output", str(dst)]) == 0
    (row,) = [json.loads(line) for line in dst.read_text().splitlines()]
    assert row["ids"] == hf_greedy(models[0], PROMPT, 6)  # lossless: the target's own greedy ids
    with pytest.raises(UserError, match="Org/NoHead: not a local path, and this draft head is not in"):
        hub.local_or_snapshot("Org/NoHead", "draft head")
