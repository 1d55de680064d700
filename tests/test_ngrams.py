"""Answer n-gram table (jetspec_jax/ngrams.py): device chains against a brute-force host n-gram model
built with Python dicts of token tuples (no hashing, no pruning), files, bad tables, decoding."""

from __future__ import annotations

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jetspec_jax.decode import generate
from jetspec_jax.errors import UserError
from jetspec_jax.loading.head_io import load_head_dir, save_head_dir, save_ngrams
from jetspec_jax.ngrams import FILE, LONG, build_table, ngram_continuations, without_ngrams
from jetspec_jax.step import DecodeConfig
from jetspec_jax.tree import TreeConfig


def host_model(sequences, orders, min_count):
    """{order: {context tuple: most frequent successor (ties: lower id)}} over answer successors."""
    model = {}
    for n in orders:
        counts = collections.defaultdict(collections.Counter)
        for tokens, p in sequences:
            for q in range(max(p - 1, n - 1), len(tokens) - 1):
                counts[tuple(tokens[q - n + 1 : q + 1])][tokens[q + 1]] += 1
        model[n] = {ctx: min(c, key=lambda t: (-c[t], t)) for ctx, c in counts.items()
                    if sum(c.values()) >= min_count}
    return model


def host_chain(model, text, length):
    """-> (the longest context the first step knew, 0: none; the chain)."""
    text, out, first = list(text), [], 0
    for i in range(length):
        n = next((n for n in sorted(model, reverse=True) if len(text) >= n and tuple(text[-n:]) in model[n]), 0)
        if not n:
            return first, out + [0] * (length - i)
        first = first or n
        out.append(model[n][tuple(text[-n:])])
        text.append(out[-1])
    return first, out


def corpus(seed, count=40, vocab=6):
    """Sequences that repeat a few phrases with noise, so that contexts of every order recur."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(0, vocab, size=rng.integers(3, 7)).tolist() for _ in range(5)]
    out = []
    for _ in range(count):
        toks = rng.integers(0, vocab, size=3).tolist()
        p = len(toks)
        for _ in range(rng.integers(2, 6)):
            toks += phrases[rng.integers(len(phrases))] if rng.random() < 0.8 else [int(rng.integers(vocab))]
        out.append((np.array(toks), p))
    return out


@pytest.mark.parametrize("orders,min_count", [((2, 3, 5), 1), ((2, 3, 5), 2), ((1, 4), 1), ((3,), 3),
                                              ((1, 2, 4, 5, 6), 1)])
def test_device_chains_match_the_brute_force_model(orders, min_count):
    seqs = corpus(0)
    table = build_table(seqs, orders, min_count)
    model = host_model(seqs, orders, min_count)
    assert len(table["keys"]) <= sum(len(m) for m in model.values())  # pruning only removes
    rng = np.random.default_rng(1)
    texts = [t[: rng.integers(1, len(t) + 1)] for t, _ in seqs[:20] + corpus(2, count=10)]
    texts += [rng.integers(0, 9, size=rng.integers(1, 12)) for _ in range(20)]  # ids 6-8 never seen
    width = max(len(t) for t in texts) + 4
    history = np.zeros((len(texts), width), np.int32)
    for i, t in enumerate(texts):
        history[i, : len(t)] = t
    c = np.array([len(t) - 1 for t in texts], np.int32)
    order, chains = ngram_continuations(jnp.asarray(table["keys"]), jnp.asarray(table["next"]),
                                        jnp.asarray(history), jnp.asarray(c), 6, tuple(orders))
    expect = [host_chain(model, t, 6) for t in texts]
    order, want = np.asarray(order), np.array([e[0] for e in expect])
    # pruning may leave the first step's longest context out, never across the band boundary
    assert np.all(order <= want) and np.array_equal(order > 0, want > 0)
    assert np.array_equal(order >= LONG, want >= LONG)
    assert np.asarray(chains).tolist() == [e[1] for e in expect]
    assert 0 < np.mean(np.asarray(order) > 0) < 1  # both kinds of rows were exercised


def test_the_branch_takes_the_table_where_the_text_has_no_match():
    from jetspec_jax.lookup import NONE, SHORT, TABLE, TABLE_LOW, TEXT, branch_continuations, lookup_continuations

    seqs = corpus(0)
    orders = (2, 3, 4)
    table = build_table(seqs, orders, 1)
    rng = np.random.default_rng(4)
    texts = [t[: rng.integers(1, len(t) + 1)] for t, _ in corpus(5, count=30)]
    texts += [t[q - 4 : q] for t, _ in seqs[:20] for q in [rng.integers(4, len(t) + 1)]]  # 4 answer tokens
    texts += [rng.integers(0, 9, size=rng.integers(1, 12)) for _ in range(20)]
    history = np.zeros((len(texts), 40), np.int32)
    for i, t in enumerate(texts):
        history[i, : len(t)] = t
    history, c = jnp.asarray(history), jnp.asarray([len(t) - 1 for t in texts], jnp.int32)
    keys, nxt = jnp.asarray(table["keys"]), jnp.asarray(table["next"])
    source, forced = jax.device_get(branch_continuations(history, c, 6, {"ngram_keys": keys, "ngram_next": nxt},
                                                         orders))
    match, copied = jax.device_get(lookup_continuations(history, c, 6))
    order, chains = jax.device_get(ngram_continuations(keys, nxt, history, c, 6, orders))
    for r in range(len(texts)):
        if match[r]:
            assert source[r] == (TEXT if match[r] >= 4 else SHORT) and forced[r].tolist() == copied[r].tolist()
        elif order[r]:
            assert source[r] == (TABLE if order[r] >= LONG else TABLE_LOW)
            assert forced[r].tolist() == chains[r].tolist()
        else:
            assert source[r] == NONE
    assert {NONE, TABLE, TABLE_LOW, SHORT} <= set(source.tolist())  # each kind of row was exercised


def test_pruning_keeps_only_what_changes_a_draft():
    seqs = corpus(3)
    full = sum(len(m) for m in host_model(seqs, (2, 3, 4, 6), 1).values())
    assert len(build_table(seqs, (2, 3, 4, 6), 1)["keys"]) < full / 2


def test_the_back_off_band_leaves_the_longer_orders_as_they_are():
    """Orders below LONG never prune a longer order's entry: the table with the band holds every
    entry of the table without it (same successor), so rows known at LONG+ tokens draft the same."""
    seqs = corpus(6)
    high = build_table(seqs, (LONG, LONG + 1, LONG + 3), 1)
    both = build_table(seqs, (2, 3, LONG, LONG + 1, LONG + 3), 1)
    pairs = dict(zip(both["keys"].tolist(), both["next"].tolist()))
    assert all(pairs.get(k) == n for k, n in zip(high["keys"].tolist(), high["next"].tolist()))
    assert len(both["keys"]) > len(high["keys"])


@pytest.fixture(scope="module")
def setup():
    from test_speculative import HEAD, TARGET
    from jetspec_jax.head import init_head_params
    from jetspec_jax.model import init_params

    params = {"target": init_params(TARGET, jax.random.PRNGKey(0)), "head": init_head_params(HEAD, jax.random.PRNGKey(1))}
    return TARGET, HEAD, params


def test_decoding_with_a_table_is_lossless_and_uses_it(setup):
    target, head, params = setup
    prompts = [[7, 1, 3, 3, 8, 12, 40], [11, 2], [30, 31, 32, 33]]
    ar = generate({"target": params["target"]}, prompts, DecodeConfig(target=target), max_new_tokens=40)
    # The table knows these answers (as it knows the target's training answers).
    table = build_table([(np.array(p + g.ids), len(p)) for p, g in zip(prompts, ar)], (2, 3, 4), 1)
    with_table = {**params, "head": {**params["head"], "ngram_keys": jnp.asarray(table["keys"]),
                                     "ngram_next": jnp.asarray(table["next"])}}
    tree = TreeConfig(budget=6, width=3, depth=5, lookup=5)
    plain = generate(params, prompts, DecodeConfig(target=target, head=head, tree=tree), max_new_tokens=40)
    out = generate(with_table, prompts, DecodeConfig(target=target, head=head.replace(ngram_orders=(2, 3, 4)),
                                                     tree=tree), max_new_tokens=40)
    assert [g.ids for g in out] == [g.ids for g in ar] == [g.ids for g in plain]
    rounds = lambda gens: sum(len(g.accept_lengths) for g in gens)  # noqa: E731
    assert rounds(out) < rounds(plain)


def test_head_dir_round_trip_and_bad_tables(setup, tmp_path):
    _, head, params = setup
    table = build_table(corpus(4), (2, 3), 1)
    hp = {**params["head"], "ngram_keys": table["keys"], "ngram_next": table["next"]}
    save_head_dir(tmp_path / "h", head.replace(ngram_orders=(3, 2)), hp)
    assert "ngram" not in json.loads((tmp_path / "h" / "config.json").read_text())
    cfg, loaded = load_head_dir(tmp_path / "h")
    assert cfg.ngram_orders == (2, 3)
    np.testing.assert_array_equal(loaded["ngram_keys"], table["keys"])
    np.testing.assert_array_equal(loaded["ngram_next"], table["next"])
    bare_cfg, bare = without_ngrams(cfg, loaded)
    assert bare_cfg == head and "ngram_keys" not in bare

    good = (tmp_path / "h" / FILE).read_bytes()
    bad = [({**table, "keys": table["keys"][::-1].copy()}, "not sorted"),
           ({**table, "next": np.full_like(table["next"], head.vocab_size)}, "next ids must lie"),
           ({**table, "next": table["next"][:-1]}, "keys and next"),
           ({**table, "orders": np.array([0], np.int32)}, "orders")]
    for t, message in bad:
        with pytest.raises(UserError, match=message):  # refused before anything is written
            save_ngrams(tmp_path / "h", t, head.vocab_size)
        assert (tmp_path / "h" / FILE).read_bytes() == good
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, np.int32) for k, v in bad[0][0].items()}, str(tmp_path / "h" / FILE))
    with pytest.raises(UserError, match="not sorted") as e:
        load_head_dir(tmp_path / "h")
    assert "\n" not in str(e.value)
    (tmp_path / "h" / FILE).write_bytes(good[:100])
    with pytest.raises(UserError, match="unreadable"):
        load_head_dir(tmp_path / "h")


def test_build_and_ship_scripts(tmp_path, capsys):
    """scripts/build_ngrams.py and scripts/ship_head.py on the committed answers: one-line errors on bad
    options, and a table the head directory then loads with."""
    import shutil
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    sys.path.insert(0, str(root / "scripts"))
    import build_ngrams
    import ship_head

    head = tmp_path / "head"
    shipped = root / "jetspec_jax" / "heads" / "smollm2-135m-causal"
    shutil.copytree(shipped, head)
    (head / FILE).unlink()
    data = str(root / "data" / "smollm2-135m")
    for argv, message in [(["--orders", "4,x"], "--orders"), (["--orders", "0,4"], "--orders"),
                          (["--min-count", "0"], "--min-count")]:
        assert build_ngrams.main(["--data", data, "--head", str(head), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and err.count("\n") == 1
        assert not (head / FILE).exists()  # nothing written
    assert ship_head.main(["--head", str(tmp_path / "missing"), "--data", data, "--to", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error:") and not (tmp_path / "out").exists()

    assert build_ngrams.main(["--data", data, "--head", str(head), "--orders", "12,16", "--min-count", "2"]) == 0
    cfg, params = load_head_dir(head)
    assert cfg.ngram_orders == (12, 16) and len(params["ngram_keys"]) > 1000
