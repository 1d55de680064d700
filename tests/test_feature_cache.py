"""The feature cache, reduced draft vocabularies and cache-based validation.

- the cache holds exactly the target's taps (float16) and top-k log-probs; a rebuild resumes;
  a stale or truncated cache is a one-line error;
- the loss on cached features equals the loss with the target run inside the step;
- a reduced-vocabulary head trains from the cache, exports its d2t table, loads back, and decoding
  with it (greedy and sampled) still emits exactly the target's tokens;
- validation tau equals a brute-force host count of the accepted path.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetspec_jax.decode import generate
from jetspec_jax.errors import UserError
from jetspec_jax.head import HeadConfig, init_head_params
from jetspec_jax.loading.head_io import load_head_dir, save_head_dir
from jetspec_jax.model import Transformer, init_params
from jetspec_jax.step import DecodeConfig
from jetspec_jax.train.config import parse_config
from jetspec_jax.train.feature_store import FeatureStore
from jetspec_jax.train.features import CacheSpec, build_feature_cache, build_order, is_validation
from jetspec_jax.train.objective import ObjectiveConfig, anchor_loss, target_features
from jetspec_jax.train.shards import read_sequences
from jetspec_jax.train.trainer import train
from jetspec_jax.train.validate import accepted_depth, draft_vocabulary, vocab_tables
from jetspec_jax.tree import TreeConfig, build_tree

sys.path.insert(0, str(Path(__file__).parent))
from test_train import MASK, TARGET, VOCAB, _synthetic_data  # noqa: E402

TAPS = (1, 2, 3)
SPEC = CacheSpec(target="tiny", taps=TAPS, max_length=64, top_k=4, hidden_size=TARGET.hidden_size)


@pytest.fixture(scope="module")
def target():
    params = jax.jit(init_params, static_argnums=0)(TARGET, jax.random.PRNGKey(0))
    return types.SimpleNamespace(config=TARGET, params=params, eos_ids=(1,))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, target):
    tmp = tmp_path_factory.mktemp("cache")
    _synthetic_data(tmp / "data")
    data = read_sequences(tmp / "data")
    build_feature_cache(target, data, tmp / "feat", SPEC, shard_size=7, batch_size=3, progress=False)
    return types.SimpleNamespace(root=tmp, data=data, store=FeatureStore.open(tmp / "feat", SPEC, data))


def test_cache_holds_the_targets_taps_and_top_k(cache, target):
    assert len(cache.store.cached()) == len(cache.data)
    cfg = ObjectiveConfig(target=TARGET, head=_head(TAPS))
    for i in (0, 5, 17):
        tokens = jnp.asarray(cache.data.tokens[i][None])
        want, _ = target_features(cfg, target.params, tokens)
        got = cache.store.batch(cache.data, [i], 64, TAPS)
        n = tokens.shape[1]
        np.testing.assert_allclose(got.features[0, :n], want[0], rtol=2e-3, atol=2e-3)  # float16 storage
        logits, _, _ = Transformer(TARGET).apply(
            {"params": target.params}, tokens, jnp.arange(n)[None],
            __import__("jetspec_jax.model", fromlist=["init_cache"]).init_cache(TARGET, 1, n),
            jnp.tril(jnp.ones((1, n, n), bool)))
        top_logp, top_ids = jax.lax.top_k(jax.nn.log_softmax(logits[0]), 4)
        np.testing.assert_array_equal(got.topk_ids[0, :n], top_ids)
        np.testing.assert_allclose(got.topk_logp[0, :n], top_logp, rtol=2e-3, atol=2e-3)
        # a subset of taps, in another order, is the matching columns
        sub = cache.store.batch(cache.data, [i], 64, (3, 1))
        d = TARGET.hidden_size
        np.testing.assert_array_equal(sub.features[0, :n, :d], got.features[0, :n, 2 * d:])
        np.testing.assert_array_equal(sub.features[0, :n, d:], got.features[0, :n, :d])


def test_build_order_puts_validation_first_and_rebuild_resumes(tmp_path, target, cache):
    keys = cache.data.keys
    order = build_order(keys)
    flags = [is_validation(keys[i]) for i in order]
    assert flags == sorted(flags, reverse=True) and sorted(order) == list(range(len(keys)))
    many = [f"{name}/{i}" for name in ("a", "b", "c") for i in range(40)]
    first = build_order(many, ("c",))  # set c's training sequences right after the validation split
    rank = [(not is_validation(many[i]), not many[i].startswith("c/")) for i in first]
    assert rank == sorted(rank) and sorted(first) == list(range(len(many)))
    assert 0 < sum(is_validation(k) for k in many) < 40 and rank[-1] == (True, True)
    plain = build_order(many)
    assert [i for i in first if is_validation(many[i])] == [i for i in plain if is_validation(many[i])]
    _synthetic_data(tmp_path / "data")
    data = read_sequences(tmp_path / "data")
    build_feature_cache(target, data, tmp_path / "feat", SPEC, shard_size=5, limit=10, progress=False)
    first = sorted((tmp_path / "feat").glob("shard-*.json"))
    assert len(FeatureStore.open(tmp_path / "feat", SPEC, data).cached()) == 10 and len(first) == 2
    stamps = [p.stat().st_mtime_ns for p in first]
    build_feature_cache(target, data, tmp_path / "feat", SPEC, shard_size=5, progress=False)
    assert [p.stat().st_mtime_ns for p in first] == stamps  # finished shards are not redone
    store = FeatureStore.open(tmp_path / "feat", SPEC, data)
    assert list(store.cached()) == list(range(len(data)))
    np.testing.assert_array_equal(store.batch(data, [3], 64, TAPS).features, cache.store.batch(cache.data, [3], 64, TAPS).features)


def test_stale_truncated_or_mismatched_cache_is_one_line_error(tmp_path, target):
    _synthetic_data(tmp_path / "data")
    data = read_sequences(tmp_path / "data")
    build_feature_cache(target, data, tmp_path / "feat", SPEC, shard_size=12, progress=False)
    changed = read_sequences(tmp_path / "data")
    changed.tokens[0] = changed.tokens[0].copy()
    changed.tokens[0][-1] += 1
    with pytest.raises(UserError, match="stale feature cache"):
        FeatureStore.open(tmp_path / "feat", SPEC, changed)
    with pytest.raises(UserError, match="other settings"):
        FeatureStore.open(tmp_path / "feat", CacheSpec(**{**SPEC.__dict__, "top_k": 8}), data)
    with pytest.raises(UserError, match="other settings"):  # a rebuild with other taps is refused too
        build_feature_cache(target, data, tmp_path / "feat", CacheSpec(**{**SPEC.__dict__, "taps": (1,)}),
                            progress=False)
    feat = sorted((tmp_path / "feat").glob("*.feat.npy"))[0]
    size = feat.stat().st_size
    with open(feat, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(UserError, match="truncated"):
        FeatureStore.open(tmp_path / "feat", SPEC, data)
    assert feat.stat().st_size == size - 100  # nothing rewritten behind the user's back


def _head(taps, k=None, **kw) -> HeadConfig:
    return HeadConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=40,
                      vocab_size=VOCAB, num_target_layers=4, mask_token_id=MASK, block_size=5,
                      target_layer_ids=taps, rope_theta=500.0, draft_vocab_size=k, **kw)


def test_cached_features_give_the_in_step_loss(cache, target):
    head = _head((1, 3))
    cfg = ObjectiveConfig(target=TARGET, head=head, anchors_per_seq=6, vocab_chunk=16)
    hp = init_head_params(head, jax.random.PRNGKey(2))
    batch = cache.store.batch(cache.data, [0, 1, 2], 64, (1, 3))
    args = (hp, target.params, batch.tokens, batch.lengths, batch.prompt_lens, jax.random.PRNGKey(7), cfg)
    exact = {"features": target_features(cfg, target.params, batch.tokens)[0],
             "topk_ids": batch.topk_ids, "topk_logp": batch.topk_logp}
    got, m = jax.jit(anchor_loss, static_argnums=6)(*args, exact)
    want, m2 = jax.jit(anchor_loss, static_argnums=6)(*args)  # the target runs inside the step
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(m["acc"], m2["acc"])


def _host_rows(hp, target, batch, cfg, key):
    """anchor_hidden's rows, labels, validity and label positions as host arrays."""
    from jetspec_jax.train.objective import anchor_hidden, sample_anchors

    anchors, ok = sample_anchors(key, batch.lengths, batch.prompt_lens, cfg.anchors_per_seq, batch.tokens.shape[1])
    out = anchor_hidden(hp, target.params, batch.tokens, batch.lengths, batch.prompt_lens, batch.features,
                        anchors, ok, cfg)
    return [np.asarray(x) for x in out]


def test_cached_top_k_loss_is_cross_entropy_to_the_renormalised_teacher(cache, target):
    head = _head((1, 3))
    cfg = ObjectiveConfig(target=TARGET, head=head, anchors_per_seq=6, vocab_chunk=16, loss="kl")
    hp = init_head_params(head, jax.random.PRNGKey(5))
    batch = cache.store.batch(cache.data, [6, 7], 64, (1, 3))
    key = jax.random.PRNGKey(4)
    cached = {"features": batch.features, "topk_ids": batch.topk_ids, "topk_logp": batch.topk_logp}
    got, _ = jax.jit(anchor_loss, static_argnums=6)(hp, target.params, batch.tokens, batch.lengths,
                                                   batch.prompt_lens, key, cfg, cached)
    hidden, _, valid, pos = _host_rows(hp, target, batch, cfg, key)
    table = np.asarray(target.params["embed"]["embedding"], np.float64)
    logits = hidden.astype(np.float64) @ table.T
    logq = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    total = count = 0.0
    for b, a, k in zip(*np.nonzero(valid)):
        ids, lp = batch.topk_ids[b, pos[b, a, k] - 1], batch.topk_logp[b, pos[b, a, k] - 1]
        p = np.exp(lp.astype(np.float64))
        total += -(p / p.sum() * logq[b, a, k, ids]).sum()
        count += 1
    np.testing.assert_allclose(got, total / count, rtol=1e-4)


def test_reduced_vocab_loss_projects_onto_the_draft_ids(cache, target):
    head = _head((1, 3), k=12)
    cfg = ObjectiveConfig(target=TARGET, head=head, anchors_per_seq=6, vocab_chunk=16)
    hp = init_head_params(head, jax.random.PRNGKey(3))
    batch = cache.store.batch(cache.data, [3, 4], 64, (1, 3))
    d2t = draft_vocabulary(cache.data, range(len(cache.data)), VOCAB, 12)
    vocab = vocab_tables(d2t, VOCAB)
    cached = {"features": batch.features, "topk_ids": batch.topk_ids, "topk_logp": batch.topk_logp}
    got, m = jax.jit(anchor_loss, static_argnums=6)(hp, target.params, batch.tokens, batch.lengths,
                                                   batch.prompt_lens, jax.random.PRNGKey(1), cfg, cached, vocab)
    # brute force: log-softmax over the 12 rows of the tied embedding, labels mapped to draft ids
    hidden, labels, valid, _ = _host_rows(hp, target, batch, cfg, jax.random.PRNGKey(1))
    table = np.asarray(target.params["embed"]["embedding"])[d2t]
    logq = jax.nn.log_softmax(np.asarray(hidden) @ table.T, axis=-1)
    t2d = np.asarray(vocab["t2d"])
    lab = t2d[np.asarray(labels)]
    use = np.asarray(valid) & (lab >= 0)
    w = use.astype(np.float64)
    want = -(np.take_along_axis(np.asarray(logq), np.maximum(lab, 0)[..., None], -1)[..., 0] * w).sum() / w.sum()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_accepted_depth_matches_brute_force():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(64, 4, 6)) * 2, jnp.float32)
    roots = jnp.zeros(64, jnp.int32)
    labels = rng.integers(0, 6, size=(64, 4))
    labels[::5, 2:] = -1
    tree = build_tree(roots, logits, TreeConfig(budget=9, width=3, depth=4))
    got = np.asarray(accepted_depth(tree.tokens, tree.depths, tree.mask, jnp.asarray(labels)))
    toks, parents = np.asarray(tree.tokens), np.asarray(tree.parents)
    for r in range(64):
        node, depth = 0, 0
        while True:  # walk down: the child spelling the next label
            kids = [i for i in range(9) if parents[r, i] == node and depth < 4 and toks[r, i] == labels[r, depth]]
            if not kids:
                break
            node, depth = kids[0], depth + 1
        assert got[r] == depth


def _host_lookup(history, c, length):
    """Brute force of lookup.py (tests/test_lookup.py's host search): the continuation, or None."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_lookup import host_lookup

    found, cont = host_lookup(history, c, length)
    return [int(t) for t in cont] if found else None


def _host_walk(tokens, parents, labels):
    node, depth = 0, 0
    while depth < len(labels):  # walk down: the child spelling the next label
        kids = [i for i in range(len(tokens)) if parents[i] == node and tokens[i] == labels[depth]]
        if not kids:
            break
        node, depth = kids[0], depth + 1
    return depth


def test_validation_with_lookup_matches_a_host_walk(trained, cache, target):
    """Per-sequence accepted tokens of trees with and without a prompt-lookup chain, against a host
    n-gram search and a host walk of each tree (an anchor where the search finds nothing gets the
    lookup-0 tree); per-set groups add up to the whole split."""
    from jetspec_jax.train.validate import anchor_logits, validate, validation_counts

    cfg, (head_cfg, params) = trained
    vocab = vocab_tables(np.asarray(params["d2t"]), VOCAB)
    objective = ObjectiveConfig(target=TARGET, head=head_cfg)
    batch = cache.store.batch(cache.data, np.arange(6), 64, head_cfg.target_layer_ids)
    tokens = np.array(batch.tokens)
    rng = np.random.default_rng(3)  # noise in the answers, so lookup and head both miss sometimes
    for r in range(len(tokens)):
        p, n = int(batch.prompt_lens[r]), int(batch.lengths[r])
        noisy = rng.random(n - p) < 0.25
        tokens[r, p:n][noisy] = rng.integers(2, 60, int(noisy.sum()))
    args = (params, target.params, jnp.asarray(tokens), batch.lengths, batch.prompt_lens, batch.features, vocab)
    got = jax.device_get(validation_counts(*args, cfg=objective, budgets=(3, 6), lookup=2))
    anchors, counted, logits, labels = jax.device_get(anchor_logits(*args, objective))
    d2t = np.asarray(params["d2t"])
    a = anchors.shape[1]
    for n in (3, 6):  # N=3 drafts 2 of the head's 3 depths, N=6 all of them
        depth = min(n - 1, logits.shape[1])
        want = {"": np.zeros(6, int), "_lookup": np.zeros(6, int)}
        for r in range(6 * a):
            if not counted[r]:
                continue
            b, j = divmod(r, a)
            c = int(anchors[b, j])  # the root's position
            copied = _host_lookup(tokens[b], c, 2)  # no match: the head's own tree, as lookup 0
            for suffix, lookup in (("", 0), ("_lookup", 2 if copied is not None else 0)):
                forced = copied
                tree = build_tree(jnp.array([tokens[b, c]]), jnp.asarray(logits[r : r + 1, :depth]),
                                  TreeConfig(budget=n, width=4, depth=depth, lookup=lookup),
                                  jnp.array([forced]) if lookup else None, jnp.asarray(d2t))
                want[suffix][b] += _host_walk(np.asarray(tree.tokens[0]), np.asarray(tree.parents[0]),
                                              [int(x) for x in labels[r, :depth]])
        np.testing.assert_array_equal(got[f"tree_{n}"], want[""])
        np.testing.assert_array_equal(got[f"tree_{n}_lookup"], want["_lookup"])
    assert got["tree_6_lookup"].sum() > got["tree_6"].sum() > 0  # the answers repeat: lookup finds them

    batches = [cache.store.batch(cache.data, np.arange(i, i + 3), 64, head_cfg.target_layer_ids) for i in (0, 3)]
    by_set = validate(params, target.params, vocab, objective, batches, (4,), lookup=2,
                      groups=["x", "y", "x", "y", "y", "x"])
    assert by_set["all"] == validate(params, target.params, vocab, objective, batches, (4,), lookup=2)
    assert by_set["x"]["anchors"] + by_set["y"]["anchors"] == by_set["all"]["anchors"]
    assert set(by_set["all"]) == {"anchors", "acc1", "tau_chain", "tau_4", "tau_4_lookup"}


@pytest.fixture(scope="module")
def trained(cache, target):
    raw = {"target": "tiny", "data": {"dir": str(cache.root / "data")},
           "head": {"num_layers": 1, "mask_token_id": MASK, "block_size": 4, "intermediate_size": 48,
                    "target_layer_ids": [1, 3], "draft_vocab_size": 16},
           "train": {"output_dir": str(cache.root / "out"), "steps": 80, "batch_size": 3, "max_length": 64,
                     "anchors_per_seq": 8, "lr": 1e-2, "warmup_steps": 10, "checkpoint_every": 40,
                     "vocab_chunk": 32, "val_every": 40},
           "features": {"dir": str(cache.root / "feat"), "taps": list(TAPS), "top_k": 4, "max_length": 64}}
    cfg = parse_config(raw, "t.yaml")
    return cfg, train(cfg, model=target, progress=False)


def test_reduced_vocab_head_trains_from_the_cache_and_validates(trained, cache):
    cfg, (head_cfg, params) = trained
    assert head_cfg.draft_vocab_size == 16 and params["d2t"].shape == (16,)
    counts = np.bincount(np.concatenate([t[p:] for t, p in zip(cache.data.tokens, cache.data.prompt_lens)]),
                         minlength=VOCAB)
    assert set(np.asarray(params["d2t"][:8]).tolist()) == set(np.argsort(-counts, kind="stable")[:8].tolist())
    lines = [json.loads(x) for x in open(Path(cfg.train.output_dir) / "metrics.jsonl")]
    val = [x["val"] for x in lines if "val" in x]
    assert len(val) == 2 and val[0]["anchors"] > 0
    assert val[-1]["tau_chain"] >= 1.0 and val[-1]["tau_16"] >= val[-1]["tau_4"] >= 1.0
    steps = [x for x in lines if "loss" in x]
    assert np.mean([s["loss"] for s in steps[-10:]]) < 0.5 * np.mean([s["loss"] for s in steps[:10]])
    loaded_cfg, loaded = load_head_dir(Path(cfg.train.output_dir) / "head")
    assert loaded_cfg == head_cfg
    np.testing.assert_array_equal(loaded["d2t"], params["d2t"])


def test_reduced_vocab_head_decodes_losslessly(trained, target):
    _, (head_cfg, head_params) = trained
    prompts = [[5, 9, 2, 3, 4], [7, 1, 3, 3, 8, 12, 40], [11, 2]]
    ar = generate({"target": target.params}, prompts, DecodeConfig(target=TARGET), max_new_tokens=20)
    for tree in (TreeConfig(budget=4, width=1, depth=3, kind="chain"), TreeConfig(budget=8, width=4, depth=3)):
        config = DecodeConfig(target=TARGET, head=head_cfg, tree=tree)
        out = generate({"target": target.params, "head": head_params}, prompts, config, max_new_tokens=20)
        assert [g.ids for g in out] == [g.ids for g in ar]


def test_reduced_vocab_draft_is_the_full_drafts_columns(trained, target):
    from jetspec_jax.decode import start
    from jetspec_jax.step import draft_logits, draft_tree, with_draft_table

    _, (head_cfg, head_params) = trained
    tree = TreeConfig(budget=6, width=3, depth=3)
    reduced = DecodeConfig(target=TARGET, head=head_cfg, tree=tree)
    full = DecodeConfig(target=TARGET, head=head_cfg.replace(draft_vocab_size=None), tree=tree)
    params = {"target": target.params, "head": head_params}
    full_params = {"target": target.params, "head": {k: v for k, v in head_params.items() if k != "d2t"}}
    state = start(params, [[5, 9, 2, 3], [7, 1, 3]], reduced, max_new_tokens=8)
    got, _ = draft_logits(with_draft_table(params, reduced), state.root, state.head_cache, reduced)
    want, _ = draft_logits(full_params, state.root, state.head_cache, full)
    d2t = np.asarray(head_params["d2t"])
    np.testing.assert_allclose(got, np.asarray(want)[..., d2t], rtol=1e-5, atol=1e-5)
    tree_r, _ = draft_tree(params, state, reduced)  # drafts map back to target ids
    np.testing.assert_array_equal(tree_r.tokens[:, 1:], d2t[np.asarray(build_tree(state.root, got, tree).tokens[:, 1:])])


def test_bad_d2t_is_one_line_error_and_nothing_is_overwritten(tmp_path, trained):
    _, (head_cfg, params) = trained
    for bad, match in ((np.arange(15), "shape"), (np.r_[np.arange(15), VOCAB + 3], "outside"),
                       (np.r_[np.arange(15), 0], "repeats")):
        path = tmp_path / f"head{len(list(tmp_path.iterdir()))}"
        save_head_dir(path, head_cfg.replace(draft_vocab_size=None), {k: v for k, v in params.items() if k != "d2t"})
        raw = json.loads((path / "config.json").read_text())
        raw["draft_vocab_size"] = 16
        (path / "config.json").write_text(json.dumps(raw))
        from safetensors.numpy import load_file, save_file

        tensors = load_file(path / "model.safetensors")
        before = (path / "config.json").read_bytes()
        save_file({**tensors, "d2t": bad.astype(np.int64)}, path / "model.safetensors")
        with pytest.raises(UserError, match=match):
            load_head_dir(path)
        assert (path / "config.json").read_bytes() == before


def test_cli_builds_the_cache_then_trains_a_reduced_vocab_head(tmp_path, capsys, make_tiny_hf):
    """`--stage features` then `--stage train` (the first 3 rows of each block) on a tiny HF target;
    a rerun of the features stage resumes (nothing to add); scripts/val_heads.py compares heads on
    the split, by set and with lookup; bad features settings are one-line errors."""
    from test_train import _write_yaml

    from jetspec_jax.train.__main__ import main

    _synthetic_data(tmp_path / "data", vocab=160)
    raw = {"target": str(make_tiny_hf("llama")), "data": {"dir": str(tmp_path / "data")},
           "head": {"num_layers": 1, "mask_token_id": 3, "block_size": 4, "target_layer_ids": [0, 1],
                    "draft_vocab_size": 32},
           "train": {"output_dir": str(tmp_path / "out"), "steps": 2, "batch_size": 2, "max_length": 64,
                     "anchors_per_seq": 4, "checkpoint_every": 2, "val_every": 2, "block_rows": 3},
           "features": {"dir": str(tmp_path / "feat"), "taps": [0, 1], "max_length": 64, "shard_size": 10}}
    config = _write_yaml(tmp_path / "c.yaml", raw)
    assert main(["--config", config, "--stage", "features", "--no-progress"]) == 0
    assert "24 sequences cached" in capsys.readouterr().err
    assert main(["--config", config, "--stage", "features", "--no-progress"]) == 0  # resumes: nothing left
    assert main(["--config", config, "--stage", "train", "--no-progress"]) == 0
    head_cfg, params = load_head_dir(tmp_path / "out" / "head")
    assert head_cfg.draft_vocab_size == 32 and params["d2t"].shape == (32,)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "val" in x] == [2]
    assert all(len(x["acc"]) == 2 for x in lines if "acc" in x)  # depths 1-2 trained
    assert lines[-1]["val"]["tau_16"] >= 1.0  # validation drafts the whole block

    # init_from that head over a wider draft vocabulary: its 32 ids first, then the most frequent others
    wide = {**raw, "head": {**raw["head"], "draft_vocab_size": 48},
            "train": {**raw["train"], "output_dir": str(tmp_path / "wide"), "init_from": str(tmp_path / "out" / "head")}}
    assert main(["--config", _write_yaml(tmp_path / "wide.yaml", wide), "--stage", "train", "--no-progress"]) == 0
    wide_cfg, wide_params = load_head_dir(tmp_path / "wide" / "head")
    data = read_sequences(tmp_path / "data")
    counts = np.zeros(160, np.int64)
    for i, key in enumerate(data.keys):
        if not is_validation(key):
            np.add.at(counts, data.tokens[i][data.prompt_lens[i]:], 1)
    old = np.asarray(params["d2t"]).tolist()
    rest = sorted((t for t in range(160) if t not in old), key=lambda t: (-counts[t], t))[:16]
    assert wide_cfg.draft_vocab_size == 48 and np.asarray(wide_params["d2t"]).tolist() == old + rest
    narrow = {**wide, "head": {**raw["head"], "draft_vocab_size": 16}, "train": {**wide["train"], "output_dir": str(tmp_path / "narrow")}}
    assert main(["--config", _write_yaml(tmp_path / "narrow.yaml", narrow), "--stage", "train", "--no-progress"]) == 2
    assert "differs from this config in draft_vocab_size" in capsys.readouterr().err

    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
    import val_heads

    capsys.readouterr()
    out_json = tmp_path / "val.json"
    assert val_heads.main(["--config", config, "--head", f"new={tmp_path / 'out' / 'head'}", "--lookup", "2",
                           "--by-set", "--json", str(out_json)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "tau N=8 +2 lookup" in table[0] and [r.split(" | ")[1] for r in table[2:]] == ["all", "s"]
    got = json.loads(out_json.read_text())[0]["val"]
    assert got["all"] == got["s"] and got["all"]["tau_8_lookup"] >= 1.0
    assert val_heads.main(["--config", config, "--head", f"new={tmp_path / 'out' / 'head'}", "--lookup", "all",
                           "--json", str(out_json)]) == 0  # N-1 lookup nodes at every budget
    assert "tau N=16 +all lookup" in capsys.readouterr().out.splitlines()[0]
    with_all = json.loads(out_json.read_text())[0]["val"]["all"]
    assert with_all["tau_16_lookup"] >= 1.0
    assert val_heads.main(["--config", config, "--head", f"new={tmp_path / 'out' / 'head'}", "--lookup", "5"]) == 2
    assert capsys.readouterr().err.startswith("error: --lookup must be")
    import lookup_rules  # the match rules compared on the same split: every (N, lookup, rule) row, lookup 0 once

    assert lookup_rules.main(["--config", config, "--head", str(tmp_path / "out" / "head"), "--budgets", "4"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split(" | ")[1:3] for r in rows] == [["0", "-"], ["2", "latest-3/2"], ["2", "longest"],
                                                   ["3", "latest-3/2"], ["3", "longest"]]
    import branch_split  # splits of the lookup branch by source: the library's rule scores as val_heads decodes

    split_json = tmp_path / "split.json"
    assert branch_split.main(["--config", config, "--head", str(tmp_path / "out" / "head"), "--budgets", "4,8",
                              "--json", str(split_json)]) == 0
    report = json.loads(split_json.read_text())
    assert report["anchors"] == with_all["anchors"] and abs(sum(report["share"].values()) - 1) < 1e-9
    for n in ("4", "8"):
        rules = report["budgets"][n]["rules"]
        assert rules["library"]["val_tau"] == with_all[f"tau_{n}_lookup"]
        assert rules["best on validation"]["val_tau"] >= max(rules["library"]["val_tau"], rules["all"]["val_tau"])
        assert report["budgets"][n]["per_anchor_best"]["val_tau"] >= rules["best on validation"]["val_tau"]
    # the head drafts 3 depths, so N=8 has 3 branch nodes at most
    assert report["budgets"]["8"]["rules"]["all"]["nodes_by_source"] == {"none": 0, "table": 3, "short": 3, "text": 3,
                                                                         "table_low": 3}

    for change, expected in ((("head", "target_layer_ids", [0, 1, 2]), "are not in features.taps"),
                             (("train", "max_length", 128), "exceeds features.max_length"),
                             (("features", "taps", [0, 1, 5]), "outside the target's layers")):
        bad = json.loads(json.dumps(raw))
        bad[change[0]][change[1]] = change[2]
        capsys.readouterr()
        assert main(["--config", _write_yaml(tmp_path / "bad.yaml", bad), "--stage", "features", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err
