"""Head training: the many-anchor forward equals inference, the loss learns, runs resume exactly,
checkpoints are atomic, regeneration resumes, the CLI refuses bad configs in one line.

Everything runs on a tiny random target (float32, CPU) in well under a minute.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetspec_jax.config import ModelConfig
from jetspec_jax.errors import UserError
from jetspec_jax.head import DraftHead, HeadConfig, init_head_cache, init_head_params
from jetspec_jax.loading.head_io import load_head_dir
from jetspec_jax.model import Transformer, init_cache, init_params
from jetspec_jax.train import checkpoint as ckpt
from jetspec_jax.train.__main__ import main
from jetspec_jax.train.anchor_head import AnchorHead
from jetspec_jax.train.batches import step_indices
from jetspec_jax.train.config import parse_config
from jetspec_jax.train.data import regenerate
from jetspec_jax.train.objective import ObjectiveConfig, projected_loss, sample_anchors, target_features
from jetspec_jax.train.shards import read_sequences, write_manifest, write_shard
from jetspec_jax.train.step import StepConfig, init_train_state
from jetspec_jax.train.trainer import train

VOCAB, MASK = 64, 63
TARGET = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                     intermediate_size=48, rope_theta=500.0, tie_embeddings=True, max_position_embeddings=512)


def _head(causal=True, **kw) -> HeadConfig:
    kw = {"num_layers": 2, "target_layer_ids": (1, 2), **kw}
    return HeadConfig(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=40,
                      vocab_size=VOCAB, num_target_layers=4, mask_token_id=MASK, block_size=5, causal=causal,
                      rope_theta=500.0, **kw)


@pytest.fixture(scope="module")
def target():
    params = jax.jit(init_params, static_argnums=0)(TARGET, jax.random.PRNGKey(0))
    return types.SimpleNamespace(config=TARGET, params=params, eos_ids=(1,))


def _perturbed_head_params(cfg, seed):
    """Random head params with norm scales away from 1, so a swapped norm would show."""
    params = init_head_params(cfg, jax.random.PRNGKey(seed))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@functools.partial(jax.jit, static_argnums=0)
def _inference_block(head, head_params, features, block_embeddings, anchor):
    """What decoding does for one anchor a: the context cache holds the features of positions
    < a, then the block runs at positions a..a+Bs-1. features (1, L, F); block_embeddings (1, Bs, d).

    The features at positions >= a are NaN, so any leak past the context would show.
    """
    length, bs = features.shape[1], block_embeddings.shape[1]
    positions = jnp.arange(length)[None]
    features = jnp.where((positions < anchor)[..., None], features, jnp.nan)
    cache = DraftHead(head).apply({"params": head_params}, features, positions, init_head_cache(head, 1, length + bs),
                                  method=DraftHead.append_context)
    cache = cache.replace(lengths=jnp.reshape(anchor, (1,)).astype(jnp.int32))
    hidden, _ = DraftHead(head).apply({"params": head_params}, block_embeddings, (anchor + jnp.arange(bs))[None], cache)
    return hidden


@pytest.fixture(scope="module")
def sequence_features(target):
    """tokens (2, 24) and the target's taps of layers (1, 2) at every position."""
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 24), 0, VOCAB - 1)
    cfg = ObjectiveConfig(target=TARGET, head=_head())
    features, _ = jax.jit(target_features, static_argnums=0)(cfg, target.params, tokens)
    return tokens, features


@jax.jit
def _logits(target_params, hidden):
    return Transformer(TARGET).apply({"params": target_params}, hidden, method=Transformer.logits)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_anchor_forward_equals_inference(target, sequence_features, causal):
    head = _head(causal)
    hp = _perturbed_head_params(head, 1)
    tokens, features = sequence_features
    bs = head.block_size
    anchors = jnp.array([[3, 11, 23], [1, 9, 17]], jnp.int32)  # 23: the block runs past the end
    block = jnp.full((2, 3, bs), MASK, jnp.int32).at[:, :, 0].set(jnp.take_along_axis(tokens, anchors, 1))
    emb = Transformer(TARGET).apply({"params": target.params}, block.reshape(2, -1),
                                    method=Transformer.embed).reshape(2, 3, bs, -1)
    hidden = jax.jit(functools.partial(AnchorHead(head).apply, method=AnchorHead.anchor_blocks))(
        {"params": hp}, features, emb, anchors)
    for b in range(2):
        for j in range(3):
            ref = _inference_block(head, hp, features[b:b + 1], emb[b:b + 1, j], anchors[b, j])
            np.testing.assert_allclose(hidden[b, j], ref[0], atol=1e-5, rtol=0)
            np.testing.assert_allclose(_logits(target.params, hidden[b, j, 1:]), _logits(target.params, ref[0, 1:]),
                                       atol=1e-5, rtol=0)


def test_anchors_lie_in_the_response_and_are_distinct():
    lengths, prompt_lens = jnp.array([30, 12, 40]), jnp.array([10, 5, 38])
    anchors, valid = sample_anchors(jax.random.PRNGKey(0), lengths, prompt_lens, 8, 48)
    anchors, valid = np.asarray(anchors), np.asarray(valid)
    for b in range(3):
        got = anchors[b][valid[b]]
        candidates = set(range(int(prompt_lens[b]) - 1, int(lengths[b]) - 1))
        assert len(got) == min(8, len(candidates)) and len(set(got)) == len(got)
        assert set(got) <= candidates


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_chunked_vocab_loss_equals_full_projection(target, loss):
    cfg = ObjectiveConfig(target=TARGET, head=_head(), loss=loss, vocab_chunk=7)  # 7 does not divide 30 rows
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    hidden, teacher = jax.random.normal(keys[0], (30, 32)), jax.random.normal(keys[1], (30, 32))
    labels = jax.random.randint(keys[2], (30,), 0, VOCAB)
    got, correct, has_loss = projected_loss(cfg, target.params, hidden, labels, teacher if loss == "kl" else None)
    assert bool(jnp.all(has_loss))
    project = lambda h: Transformer(TARGET).apply({"params": target.params}, h, method=Transformer.logits)  # noqa: E731
    log_q = jax.nn.log_softmax(project(hidden))
    if loss == "ce":
        want = -log_q[jnp.arange(30), labels]
    else:
        log_p = jax.nn.log_softmax(project(teacher))
        want = jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(correct, jnp.argmax(log_q, -1) == labels)


def test_loss_decay_weighs_depths_exponentially(target):
    from jetspec_jax.train.objective import anchor_loss

    head_params = init_head_params(_head(), jax.random.PRNGKey(4))
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 24), 0, VOCAB - 1)
    args = (head_params, target.params, tokens, jnp.array([24, 17]), jnp.array([5, 3]), jax.random.PRNGKey(6))
    fn = jax.jit(anchor_loss, static_argnums=6)
    flat, m = fn(*args, ObjectiveConfig(target=TARGET, head=_head(), anchors_per_seq=6))
    decayed, m2 = fn(*args, ObjectiveConfig(target=TARGET, head=_head(), anchors_per_seq=6, loss_decay_gamma=2.0))
    np.testing.assert_allclose(m2["depth_loss"], m["depth_loss"], rtol=1e-6)  # same anchors, same rows
    n, per = np.asarray(m["depth_rows"]), np.asarray(m["depth_loss"])
    assert n[0] > n[-1] > 0  # late depths fall off the end of some sequences
    w = np.exp(-np.arange(len(n)) / 2.0)
    np.testing.assert_allclose(flat, (n * per).sum() / n.sum(), rtol=1e-5)
    np.testing.assert_allclose(decayed, (w * n * per).sum() / (w * n).sum(), rtol=1e-5)


def test_target_features_match_the_full_forward(target):
    """The forward stops at the deepest tap (and, for KL, the last layer): same taps, and the
    final hidden state gives the target's own logits."""
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 16), 0, VOCAB)
    cfg = ObjectiveConfig(target=TARGET, head=_head(num_layers=1, target_layer_ids=(1,)), loss="kl")
    features, final = jax.jit(target_features, static_argnums=0)(cfg, target.params, tokens)
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((16, 16), bool)), (2, 16, 16))
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    full_forward = jax.jit(functools.partial(Transformer(TARGET).apply, taps=(1,)))
    logits, taps, _ = full_forward({"params": target.params}, tokens, positions, init_cache(TARGET, 2, 16), causal)
    np.testing.assert_allclose(features, taps, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_logits(target.params, final), logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Training runs on synthetic sequences
# ---------------------------------------------------------------------------------------------

def _synthetic_data(directory, count=24, seed=0, vocab=VOCAB):
    """Prompts of random tokens, then a response that counts up from a random start through 8
    tokens (2..9, cyclic): a pattern the head can learn from the anchor token alone."""
    rng = np.random.default_rng(seed)
    seqs, plens = [], []
    for _ in range(count):
        p, r = int(rng.integers(4, 10)), int(rng.integers(30, 50))
        start = int(rng.integers(0, 8))
        seqs.append(list(rng.integers(2, 60, p)) + [(start + i) % 8 + 2 for i in range(r)])
        plens.append(p)
    write_manifest(directory, {"vocab_size": vocab})
    write_shard(directory, 0, seqs[: count // 2], plens[: count // 2], [f"s/{i}" for i in range(count // 2)],
                [True] * (count // 2), vocab)
    write_shard(directory, 1, seqs[count // 2:], plens[count // 2:], [f"s/{i}" for i in range(count // 2, count)],
                [False] * (count - count // 2), vocab)
    return seqs, plens


STEPS, KILL_AT = 120, 70  # checkpoints at 60 and 120; a kill at 70 loses steps 60..70


def _config(tmp_path, **train):
    raw = {
        "target": "tiny",
        "data": {"dir": str(tmp_path / "data")},
        "head": {"num_layers": 1, "mask_token_id": MASK, "block_size": 4, "intermediate_size": 48},
        "train": {"output_dir": str(tmp_path / "out"), "steps": STEPS, "batch_size": 3, "max_length": 64,
                  "anchors_per_seq": 8, "lr": 1e-2, "warmup_steps": 10, "checkpoint_every": 60,
                  "vocab_chunk": 32, **train},
    }
    return parse_config(raw, "test.yaml")


def test_stored_sequences_round_trip(tmp_path):
    seqs, plens = _synthetic_data(tmp_path / "data")
    data = read_sequences(tmp_path / "data")
    assert [t.tolist() for t in data.tokens] == seqs and data.prompt_lens.tolist() == plens
    assert data.keys == [f"s/{i}" for i in range(24)] and data.tokens[0].dtype == np.int32
    # readable by others like the heads' files (mkstemp alone would leave them 0600)
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "data").iterdir() if p.name != ".lock"} == {"0o644"}


def test_data_stats_counts_by_set(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "scripts"))
    import data_stats

    write_manifest(tmp_path, {"target": "t"})
    # a/0: 3-token prompt + 2 answer tokens, stopped; a/1: 1 + 4, hit the limit; b/0: 2 + 1, stopped
    write_shard(tmp_path, 0, [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [7, 8, 9]], [3, 1, 2], ["a/0", "a/1", "b/0"],
                [True, False, True], 100)
    rows = {r["set"]: r for r in data_stats.stats(tmp_path)}
    assert (rows["a"]["answers"], rows["a"]["response_tokens"], rows["a"]["hit_limit"]) == (2, 6, 0.5)
    assert (rows["b"]["answers"], rows["b"]["response_tokens"], rows["b"]["mean_length"]) == (1, 1, 1.0)
    assert (rows["total"]["answers"], rows["total"]["response_tokens"]) == (3, 7)
    assert data_stats.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, target):
    """An uninterrupted run: final params, per-step losses, depth-1 accuracies and data indices."""
    tmp = tmp_path_factory.mktemp("straight")
    _synthetic_data(tmp / "data")
    log = {"loss": [], "acc1": [], "indices": {}}

    def record(step, metrics, indices):
        log["loss"].append(float(metrics["loss"]))
        log["acc1"].append(float(metrics["acc"][0]))
        log["indices"][step] = indices.tolist()

    _, params = train(_config(tmp), model=target, progress=False, on_step=record)
    return params, log


def test_loss_decreases(straight_run):
    _, log = straight_run
    first, last = np.mean(log["loss"][:10]), np.mean(log["loss"][-10:])
    assert last < 0.3 * first, log["loss"]
    assert np.mean(log["acc1"][-10:]) > 0.7  # the counting pattern is learnt, not just its tokens


def test_resume_after_kill_is_identical(tmp_path, target, straight_run):
    straight, log = straight_run
    _synthetic_data(tmp_path / "data")
    cfg = _config(tmp_path)
    seen = {}

    class Killed(Exception):
        pass

    def kill(step, metrics, indices):
        seen[step] = indices.tolist()
        if step == KILL_AT:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, model=target, progress=False, on_step=kill)
    assert ckpt.checkpoint_steps(tmp_path / "out" / "checkpoints") == [60]
    resumed_steps = []

    def record(step, metrics, indices):
        resumed_steps.append(step)
        seen[step] = indices.tolist()

    _, resumed = train(cfg, model=target, progress=False, on_step=record)
    assert resumed_steps == list(range(60, STEPS))  # continues after the last checkpoint
    assert seen == log["indices"]  # the same sequences at every step: none repeated or skipped
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, straight)
    # The exported head is the trained one, in the format DraftHead loads.
    head_cfg, exported = load_head_dir(tmp_path / "out" / "head")
    assert head_cfg.block_size == 4 and head_cfg.causal
    jax.tree_util.tree_map(np.testing.assert_array_equal, exported, resumed)
    with pytest.raises(UserError, match="another config"):  # never continue a different run
        train(_config(tmp_path, lr=2e-2), model=target, progress=False)


def test_data_order_covers_every_sequence_once_per_epoch():
    pool = np.arange(10) * 3
    seen = np.concatenate([step_indices(pool, 4, s, seed=7) for s in range(5)])  # 20 = two epochs
    assert sorted(seen[:10]) == sorted(pool) and sorted(seen[10:]) == sorted(pool)
    np.testing.assert_array_equal(step_indices(pool, 4, 3, seed=7), seen[12:16])


_KILL_MID_SAVE = """
import os, sys, jax
from jetspec_jax.train import checkpoint as ckpt
from tests.test_train import _tiny_state
root = sys.argv[1]
ckpt.save_train_checkpoint(root, _tiny_state(1), {"run": "x"})
ckpt._publish = lambda tmp, final: os._exit(9)  # killed after writing, before the rename
ckpt.save_train_checkpoint(root, _tiny_state(2), {"run": "x"})
"""


def _tiny_state(step):
    spec = StepConfig(objective=None, steps=10)
    state = init_train_state(spec, {"w": jnp.full((3, 2), float(step))})
    return state.replace(step=jnp.asarray(step, jnp.int32))


def test_checkpoint_killed_mid_save_is_not_loadable(tmp_path):
    root = tmp_path / "ckpts"
    result = subprocess.run([sys.executable, "-c", _KILL_MID_SAVE, str(root)], capture_output=True, text=True,
                            cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert result.returncode == 9, result.stderr
    partial = list(root.glob(".tmp-step_00000002-*"))
    assert len(partial) == 1 and (partial[0] / "state").is_dir()  # the data was written ...
    assert ckpt.checkpoint_steps(root) == [1]  # ... but the checkpoint never became visible
    with pytest.raises(UserError, match="not a complete training checkpoint"):
        ckpt.restore_train_checkpoint(partial[0], like=_tiny_state(0))
    state, meta = ckpt.restore_train_checkpoint(ckpt.latest_checkpoint(root), like=_tiny_state(0))
    assert int(state.step) == 1 and float(state.params["w"][0, 0]) == 1.0 and meta["run"] == "x"
    ckpt.save_train_checkpoint(root, _tiny_state(3), {"run": "x"})  # the next save clears the debris
    assert not list(root.glob(".tmp-*")) and ckpt.checkpoint_steps(root) == [1, 3]


# ---------------------------------------------------------------------------------------------
# Regeneration and the CLI
# ---------------------------------------------------------------------------------------------

def test_regeneration_resumes_without_repeats(tmp_path, target, monkeypatch):
    import jetspec_jax.train.data as data_module

    prompts = [(f"p/{i}", list(range(2, 5 + i % 4))) for i in range(7)]
    kw = dict(batch_size=3, max_new_tokens=6, shard_size=3)
    regenerate(target, prompts, tmp_path / "straight", progress=False, **kw)

    real, yielded = data_module.generate_continuous, []

    def interrupted_after_four(*args, **kwargs):
        for item in real(*args, **kwargs):
            if len(yielded) == 4:
                raise KeyboardInterrupt
            yielded.append(item)
            yield item

    monkeypatch.setattr(data_module, "generate_continuous", interrupted_after_four)
    with pytest.raises(KeyboardInterrupt):
        regenerate(target, prompts, tmp_path / "resumed", progress=False, **kw)
    monkeypatch.setattr(data_module, "generate_continuous", real)
    assert len(read_sequences(tmp_path / "resumed")) == 4  # a full shard of 3 and the 1 pending
    assert regenerate(target, prompts, tmp_path / "resumed", progress=False, **kw) == 3
    straight, resumed = read_sequences(tmp_path / "straight"), read_sequences(tmp_path / "resumed")
    assert sorted(resumed.keys) == [k for k, _ in prompts]  # every prompt once
    by_key = lambda d: {k: (t.tolist(), int(p)) for k, t, p in zip(d.keys, d.tokens, d.prompt_lens)}  # noqa: E731
    assert by_key(resumed) == by_key(straight)
    for key, ids in prompts:  # stored = prompt + the target's greedy answer
        tokens, plen = by_key(straight)[key]
        assert tokens[:plen] == ids and len(tokens) > plen
    with pytest.raises(UserError, match="other settings"):
        regenerate(target, prompts, tmp_path / "resumed", progress=False, batch_size=3, max_new_tokens=9)


def test_a_data_dir_can_take_more_prompt_sets(tmp_path):
    from jetspec_jax.train.shards import read_manifest

    write_manifest(tmp_path, {"prompt_sets": ["gsm8k"], "temperature": 0.0})
    write_manifest(tmp_path, {"prompt_sets": ["gsm8k", "math"], "temperature": 0.0})
    write_manifest(tmp_path, {"prompt_sets": ["mbpp"], "temperature": 0.0})  # a subset run adds mbpp
    assert read_manifest(tmp_path) == {"prompt_sets": ["gsm8k", "math", "mbpp"], "temperature": 0.0}
    with pytest.raises(UserError, match=r"other settings \(temperature differ\)"):
        write_manifest(tmp_path, {"prompt_sets": ["gsm8k"], "temperature": 0.7})


def test_regeneration_order_keeps_the_sets_balanced():
    from jetspec_jax.train.data import _balanced_order

    prompts = [(f"a/{i}", [0] * (10 - i)) for i in range(6)] + [(f"b/{i}", [0] * (i + 1)) for i in range(3)]
    done = {"a/0", "a/1", "a/2"}  # set a is half stored, b not at all
    order = [k for k, _ in _balanced_order([p for p in prompts if p[0] not in done], prompts, done)]
    assert sorted(order) == sorted(k for k, _ in prompts if k not in done)
    # b (0/3 stored) goes first until it catches up with a (3/6); within a set, shortest first
    assert order == ["b/0", "b/1", "a/5", "b/2", "a/4", "a/3"]


def test_a_second_writer_of_a_data_dir_is_refused(tmp_path, target):
    from jetspec_jax.train.shards import exclusive

    with exclusive(tmp_path / "d", "regenerating data"):
        with pytest.raises(UserError, match="in use by another process"):
            regenerate(target, [("p/0", [2, 3])], tmp_path / "d", progress=False, batch_size=1, max_new_tokens=2)
    assert regenerate(target, [("p/0", [2, 3])], tmp_path / "d", progress=False, batch_size=1, max_new_tokens=2) == 1


def test_truncated_block_trains_exactly_the_first_rows(target):
    """A causal head's rows see only earlier rows, so scoring the first R rows of each block is the
    full block's first R-1 depths: same per-depth losses and hits on the same anchors, and the mean
    is theirs weighted by depth, so the step gets the full loss with the later depths left out."""
    from jetspec_jax.train.objective import anchor_loss

    head_params = _perturbed_head_params(_head(), 7)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 24), 0, VOCAB - 1)
    args = (head_params, target.params, tokens, jnp.array([24, 17]), jnp.array([5, 3]), jax.random.PRNGKey(6))
    fn = jax.jit(anchor_loss, static_argnums=6)
    full = ObjectiveConfig(target=TARGET, head=_head(), anchors_per_seq=6, loss_decay_gamma=2.0)
    _, m = fn(*args, full)
    short, ms = fn(*args, ObjectiveConfig(target=TARGET, head=_head(), anchors_per_seq=6, loss_decay_gamma=2.0,
                                          block_rows=3))
    assert ms["acc"].shape == (2,) and m["acc"].shape == (4,)
    np.testing.assert_allclose(ms["depth_loss"], m["depth_loss"][:2], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ms["acc"], m["acc"][:2])
    np.testing.assert_array_equal(ms["depth_rows"], m["depth_rows"][:2])
    n, per, w = np.asarray(m["depth_rows"][:2]), np.asarray(m["depth_loss"][:2]), np.exp(-np.arange(2) / 2.0)
    np.testing.assert_allclose(short, (w * n * per).sum() / (w * n).sum(), rtol=1e-5)
    # a bidirectional row sees the rows after it: truncating its block would train another function
    with pytest.raises(ValueError, match="causal"):
        fn(*args, ObjectiveConfig(target=TARGET, head=_head(causal=False), anchors_per_seq=6, block_rows=3))


def _write_yaml(path, raw):
    path.write_text(json.dumps(raw))  # JSON is YAML
    return str(path)


CONFIG_DIR = Path(__file__).parent.parent / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))  # configs/ablation/ too


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    from jetspec_jax.train.config import read_config

    cfg = read_config(path)  # validates every section, refuses evaluation sets
    assert cfg.target == "smollm2-135m" and cfg.data.dir == "data/smollm2-135m"


@pytest.mark.parametrize("case,expected", [
    ("missing", "no such config file"),
    ("unknown_key", "train.lrate: unknown key"),
    ("eval_set", "math500 are evaluation-only"),
    ("bad_type", "train.steps: expected int"),
    ("incompatible", "taps target layers"),
    ("base_missing", "base: no such config file"),
    ("base_cycle", "configs include each other"),
    ("base_same_output", "train.output_dir: set one of its own"),
    ("rows_bidirectional", "train.block_rows must be in [2, head.block_size] and needs head.causal"),
    ("rows_too_many", "train.block_rows must be in [2, head.block_size]"),
])
def test_cli_bad_config_is_one_line_error(tmp_path, capsys, make_tiny_hf, case, expected):
    raw = {"target": str(make_tiny_hf("llama")), "data": {"dir": str(tmp_path / "d")},
           "head": {"num_layers": 1, "mask_token_id": 3}, "train": {"output_dir": str(tmp_path / "o"), "steps": 2}}
    if case == "unknown_key":
        raw["train"]["lrate"] = 1e-3
    elif case == "eval_set":
        raw["data"]["prompt_sets"] = ["gsm8k", "math500"]
    elif case == "bad_type":
        raw["train"]["steps"] = "many"
    elif case == "incompatible":
        raw["head"]["target_layer_ids"] = [0, 7]  # the tiny target has 2 layers
    elif case == "rows_bidirectional":
        raw["head"]["causal"], raw["train"]["block_rows"] = False, 8
    elif case == "rows_too_many":
        raw["train"]["block_rows"] = 17  # the block has 16 rows
    elif case == "base_missing":
        raw["base"] = "absent.yaml"
    elif case == "base_cycle":
        raw["base"] = "b.yaml"
        _write_yaml(tmp_path / "b.yaml", {"base": "c.yaml"})
    elif case == "base_same_output":
        _write_yaml(tmp_path / "b.yaml", raw)
        raw = {"base": "b.yaml", "train": {"steps": 3}}
    path = str(tmp_path / "absent.yaml") if case == "missing" else _write_yaml(tmp_path / "c.yaml", raw)
    capsys.readouterr()  # drop what the fixture printed
    assert main(["--config", path, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err


def test_new_heads_tap_low_to_late_layers_whatever_their_depth():
    from jetspec_jax.train.trainer import training_taps

    assert training_taps(30) == (1, 8, 14, 20, 27)  # DFlash's five for 30 layers
    assert training_taps(36) == (1, 9, 17, 25, 33)
    assert training_taps(4) == (0, 1, 2, 3)


def test_config_base_is_overridden_key_by_key(tmp_path):
    from jetspec_jax.train.config import read_config

    base = {"target": "t", "data": {"dir": "d", "prompt_sets": ["mbpp"]},
            "head": {"num_layers": 1, "mask_token_id": 3, "block_size": 8},
            "train": {"output_dir": "o", "steps": 10, "lr": 1e-3, "seed": 1}}
    (tmp_path / "sub").mkdir()
    _write_yaml(tmp_path / "sub" / "base.yaml", base)  # named relative to the config's own folder
    _write_yaml(tmp_path / "sub" / "mid.yaml", {"base": "base.yaml", "train": {"output_dir": "o2", "steps": 20, "seed": 2}})
    cfg = read_config(_write_yaml(tmp_path / "sub" / "top.yaml",
                                  {"base": "mid.yaml", "head": {"causal": False},
                                   "train": {"output_dir": "o3", "seed": 3}}))
    assert (cfg.target, cfg.data.dir, cfg.data.prompt_sets) == ("t", "d", ("mbpp",))
    assert (cfg.head.num_layers, cfg.head.block_size, cfg.head.causal) == (1, 8, False)
    assert (cfg.train.output_dir, cfg.train.steps, cfg.train.lr, cfg.train.seed) == ("o3", 20, 1e-3, 3)


def test_cli_module_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jetspec_jax.train", "--config", str(tmp_path / "none.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: ") and "Traceback" not in result.stderr


def test_cli_trains_and_exports_a_head(tmp_path, capsys, make_tiny_hf):
    """`--stage train` end to end on a tiny HF target: config -> target -> steps -> HF head."""
    _synthetic_data(tmp_path / "data", vocab=160)
    raw = {"target": str(make_tiny_hf("llama")), "data": {"dir": str(tmp_path / "data")},
           "head": {"num_layers": 1, "mask_token_id": 3, "block_size": 4},
           "train": {"output_dir": str(tmp_path / "out"), "steps": 2, "batch_size": 2, "max_length": 64,
                     "anchors_per_seq": 4, "checkpoint_every": 2}}
    assert main(["--config", _write_yaml(tmp_path / "c.yaml", raw), "--stage", "train", "--no-progress"]) == 0
    head_cfg, _ = load_head_dir(tmp_path / "out" / "head")
    assert (head_cfg.num_target_layers, head_cfg.vocab_size, head_cfg.target_layer_ids) == (2, 160, (0, 1))
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and len(rows[0]["acc"]) == len(rows[0]["depth_loss"]) == 3

    # A second run continues from the exported head: its first step starts at that head's loss.
    raw["train"] |= {"output_dir": str(tmp_path / "more"), "init_from": str(tmp_path / "out" / "head")}
    assert main(["--config", _write_yaml(tmp_path / "c2.yaml", raw), "--stage", "train", "--no-progress"]) == 0
    more = [json.loads(line) for line in (tmp_path / "more" / "metrics.jsonl").read_text().splitlines()]
    assert more[0]["loss"] != rows[0]["loss"]  # not a fresh random init

    # A deeper head from the same one-layer head (`deepen`): its first step sees the same batch and
    # drafts exactly what the one-layer head drafts, so the loss is the same; then it trains.
    deep = {**raw, "head": {**raw["head"], "num_layers": 2}, "train": {**raw["train"], "output_dir": str(tmp_path / "deep")}}
    assert main(["--config", _write_yaml(tmp_path / "c4.yaml", deep), "--stage", "train", "--no-progress"]) == 0
    deeper = [json.loads(line) for line in (tmp_path / "deep" / "metrics.jsonl").read_text().splitlines()]
    assert deeper[0]["loss"] == pytest.approx(more[0]["loss"], rel=1e-6)
    deep_cfg, deep_params = load_head_dir(tmp_path / "deep" / "head")
    assert deep_cfg.num_layers == 2 and np.abs(np.asarray(deep_params["layers_1"]["attn"]["o_proj"]["kernel"])).max() > 0
    raw["head"]["block_size"] = 5
    raw["train"]["output_dir"] = str(tmp_path / "bad")
    assert main(["--config", _write_yaml(tmp_path / "c3.yaml", raw), "--stage", "train", "--no-progress"]) == 2
    assert "differs from this config in block_size" in capsys.readouterr().err


def test_deepened_head_drafts_exactly_like_the_shallow_one(target, sequence_features):
    """init_from a head with fewer layers: the appended layers' residual branches start at zero, so
    the deeper head computes the same block rows (to the bit), and its new layers are not all zero."""
    from jetspec_jax.train.trainer import deepen

    shallow, deep = _head(num_layers=1), _head(num_layers=3)
    params = _perturbed_head_params(shallow, 12)
    tokens, _ = sequence_features
    b = tokens.shape[0]
    feats, _ = target_features(ObjectiveConfig(target=TARGET, head=shallow), target.params, tokens)
    anchors = jnp.array([[2, 7]] * b, jnp.int32)
    emb = jax.random.normal(jax.random.PRNGKey(3), (b, 2, shallow.block_size, TARGET.hidden_size))
    run = lambda cfg, p: AnchorHead(cfg).apply({"params": p}, feats, emb, anchors, method=AnchorHead.anchor_blocks)  # noqa: E731
    deepened = deepen(params, 1, deep, jax.random.PRNGKey(4))
    assert sorted(k for k in deepened if k.startswith("layers_")) == ["layers_0", "layers_1", "layers_2"]
    np.testing.assert_array_equal(run(deep, deepened), run(shallow, params))
    for i in (1, 2):  # a fresh layer, not a copy of layer 0 nor all zero
        q = np.asarray(deepened[f"layers_{i}"]["attn"]["qkv_proj"]["kernel"])
        assert np.abs(q).max() > 0 and not np.array_equal(q, np.asarray(params["layers_0"]["attn"]["qkv_proj"]["kernel"]))
    # the same params again minus the zeroing would change the rows: the zeros are what keeps them
    live = jax.tree_util.tree_map(lambda x: x, deepened)
    live["layers_1"]["mlp"]["down_proj"]["kernel"] = jnp.ones_like(live["layers_1"]["mlp"]["down_proj"]["kernel"])
    assert not np.array_equal(np.asarray(run(deep, live)), np.asarray(run(shallow, params)))


def test_widened_taps_draft_exactly_like_the_narrow_head(target, sequence_features):
    """init_from a head that taps a subset of the new taps: the new taps start at zero weight, so
    the widened head computes the same block rows."""
    from jetspec_jax.train.trainer import widen_taps

    narrow = _head(num_layers=1, target_layer_ids=(2,))
    wide = _head(num_layers=1, target_layer_ids=(1, 2, 3))
    params = _perturbed_head_params(narrow, 11)
    tokens, _ = sequence_features
    b, length = tokens.shape
    cfg_w = ObjectiveConfig(target=TARGET, head=wide)
    feats_w, _ = target_features(cfg_w, target.params, tokens)
    d = TARGET.hidden_size
    anchors = jnp.array([[3, 9]] * b, jnp.int32)
    emb = jax.random.normal(jax.random.PRNGKey(2), (b, 2, narrow.block_size, d))
    run = lambda cfg, p, f: AnchorHead(cfg).apply({"params": p}, f, emb, anchors, method=AnchorHead.anchor_blocks)  # noqa: E731
    want = run(narrow, params, feats_w[..., d : 2 * d])
    got = run(wide, widen_taps(params, (2,), (1, 2, 3), d), feats_w)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
