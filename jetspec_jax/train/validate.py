"""Acceptance on the held-out split, measured from the feature cache without decoding.

The stored answers are the target's own greedy outputs, so at an anchor `a` the tokens a greedy
round would accept are exactly `x_{a+1}, x_{a+2}, ...`: a draft node at depth d is accepted iff
its path spells `x_{a+1..a+d}`. So tau (tokens per target forward, bonus included) of a chain or
of a best-first tree of N nodes is measured on cached features, exactly as `speculative_step`
would draft it, with no target forward:

    tau = 1 + (depth of the deepest tree node whose whole path matches the stored answer)

Labels past a sequence's end never match, so anchors near the end count short (the same for
every head compared). The anchors are a fixed draw, so two heads see the same blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jetspec_jax.model import Transformer, output_rows
from jetspec_jax.train.objective import ObjectiveConfig, anchor_hidden, sample_anchors
from jetspec_jax.tree import TreeConfig, build_tree

VAL_BUDGETS = (4, 8, 16)  # trees verified per round on CPU (see docs/bench)
VAL_WIDTH = 4
VAL_SEED = 12345
VAL_ANCHORS = 32  # per validation sequence (whatever the training step uses): ~8k anchors for 250 sequences


def accepted_depth(tree_tokens, depths, mask, labels):
    """tree_tokens, depths (R, N) (target ids; node 0 the root); mask (R, N, N) ancestor-or-self;
    labels (R, D) x_{a+1..a+D} (-1 where unknown) -> (R,) int32 accepted draft tokens."""
    d = labels.shape[1]
    want = jnp.take_along_axis(labels, jnp.clip(depths - 1, 0, d - 1), axis=1)  # (R, N)
    ok = (tree_tokens == want) | (depths == 0)
    on_path = jnp.all(ok[:, None, :] | ~mask, axis=-1)  # every ancestor-or-self matches
    return jnp.max(jnp.where(on_path, depths, 0), axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "budgets"))
def validation_counts(head_params, target_params, tokens, lengths, prompt_lens, features, vocab, *,
                      cfg: ObjectiveConfig, budgets: tuple):
    """Sums over a batch's valid anchors: {"anchors", "hit1" (depth-1 top-1 hits), "chain"
    (accepted tokens of the full-depth chain), "tree_N" for each N in budgets}."""
    b, length = tokens.shape
    key = jax.random.PRNGKey(VAL_SEED)
    anchors, ok = sample_anchors(key, lengths, prompt_lens, VAL_ANCHORS, length)
    hidden, labels, valid, _ = anchor_hidden(head_params, target_params, tokens, lengths, prompt_lens,
                                             features, anchors, ok, cfg)
    rows = hidden.reshape(b * anchors.shape[1], hidden.shape[2], -1)  # (R, D, d)
    if vocab is None:
        logits = Transformer(cfg.target).apply({"params": target_params}, rows, method=Transformer.logits)
        to_target = lambda ids: ids  # noqa: E731
    else:
        table = output_rows(cfg.target, target_params, vocab["d2t"])
        logits = jax.lax.dot_general(rows, table, (((2,), (1,)), ((), ()))).astype(jnp.float32)
        to_target = lambda ids: jnp.take(vocab["d2t"], ids)  # noqa: E731
    labels = jnp.where(valid, labels, -1).reshape(rows.shape[0], -1)  # (R, D)
    counted = ok.reshape(-1)
    hits = to_target(jnp.argmax(logits, axis=-1)) == labels  # (R, D)
    out = {"anchors": jnp.sum(counted), "hit1": jnp.sum(hits[:, 0] & counted),
           "chain": jnp.sum(jnp.sum(jnp.cumprod(hits, axis=1), axis=1) * counted)}
    roots = jnp.take_along_axis(tokens, anchors, axis=1).reshape(-1)
    for n in budgets:
        depth = min(labels.shape[1], n - 1)
        tree = build_tree(roots, logits[:, :depth], TreeConfig(budget=n, width=VAL_WIDTH, depth=depth))
        ids = jnp.concatenate([tree.tokens[:, :1], to_target(tree.tokens[:, 1:])], axis=1)
        acc = accepted_depth(ids, tree.depths, tree.mask, labels)
        out[f"tree_{n}"] = jnp.sum(acc * counted)
    return out


def validate(head_params, target_params, vocab, cfg: ObjectiveConfig, batches, budgets=VAL_BUDGETS) -> dict:
    """batches: iterable of FeatureBatch (the validation split) -> {"anchors", "acc1",
    "tau_chain", "tau_N" for each budget} (tau includes the bonus token)."""
    total = {}
    for batch in batches:
        got = jax.device_get(validation_counts(head_params, target_params, batch.tokens, batch.lengths,
                                               batch.prompt_lens, batch.features, vocab, cfg=cfg,
                                               budgets=tuple(budgets)))
        for k, v in got.items():
            total[k] = total.get(k, 0) + int(v)
    n = max(total.get("anchors", 0), 1)
    out = {"anchors": total.get("anchors", 0), "acc1": round(total["hit1"] / n, 4),
           "tau_chain": round(1 + total["chain"] / n, 4)}
    for budget in budgets:
        out[f"tau_{budget}"] = round(1 + total[f"tree_{budget}"] / n, 4)
    return out


def draft_vocabulary(data, indices, vocab_size: int, k: int) -> np.ndarray:
    """(K,) int32: the K most frequent response tokens of the sequences `indices`, most frequent
    first (ties to the lower id)."""
    counts = np.zeros(vocab_size, np.int64)
    for i in indices:
        np.add.at(counts, data.tokens[i][data.prompt_lens[i]:], 1)
    order = np.lexsort((np.arange(vocab_size), -counts))
    return order[:k].astype(np.int32)


def vocab_tables(d2t: np.ndarray, vocab_size: int) -> dict:
    """{"d2t" (K,), "t2d" (V,) target id -> draft id, -1 outside} as device arrays."""
    t2d = np.full(vocab_size, -1, np.int32)
    t2d[d2t] = np.arange(len(d2t), dtype=np.int32)
    return {"d2t": jnp.asarray(d2t, jnp.int32), "t2d": jnp.asarray(t2d)}


def coverage(data, indices, d2t: np.ndarray) -> float:
    """Share of the response tokens of `indices` that the draft vocabulary holds."""
    inside = np.zeros(int(max(d2t.max() + 1, max(int(data.tokens[i].max()) for i in indices) + 1)), bool)
    inside[d2t] = True
    total = hit = 0
    for i in indices:
        resp = data.tokens[i][data.prompt_lens[i]:]
        total += len(resp)
        hit += int(inside[resp].sum())
    return hit / max(total, 1)
