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

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jetspec_jax.lookup import branch_continuations, branch_nodes
from jetspec_jax.model import Transformer, output_rows
from jetspec_jax.train.objective import ObjectiveConfig, anchor_hidden, sample_anchors
from jetspec_jax.train.shards import prompt_set
from jetspec_jax.tree import TreeConfig, build_tree, lookup_nodes

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


def anchor_logits(head_params, target_params, tokens, lengths, prompt_lens, features, vocab, cfg: ObjectiveConfig):
    """The head's draft logits at the fixed validation anchors.

    -> anchors (B, A) int32, counted (R,) bool (a valid anchor; R = B*A), logits (R, D, V or K)
    (columns are draft ids for a reduced-vocabulary head), labels (R, D) target ids x_{a+1..a+D}
    (-1 past the sequence end).
    """
    anchors, ok = sample_anchors(jax.random.PRNGKey(VAL_SEED), lengths, prompt_lens, VAL_ANCHORS, tokens.shape[1])
    logits, labels = logits_at(head_params, target_params, tokens, lengths, prompt_lens, features, anchors, ok,
                               vocab, cfg)
    return anchors, ok.reshape(-1), logits, labels


def logits_at(head_params, target_params, tokens, lengths, prompt_lens, features, anchors, anchor_ok, vocab,
              cfg: ObjectiveConfig):
    """The head's draft logits at given anchors (B, A) -> logits (R, D, V or K), labels (R, D) target
    ids x_{a+1..a+D}, -1 past the sequence end or at an anchor that is not ok; R = B*A."""
    hidden, labels, valid, _ = anchor_hidden(head_params, target_params, tokens, lengths, prompt_lens,
                                             features, anchors, anchor_ok, cfg)
    rows = hidden.reshape(-1, hidden.shape[2], hidden.shape[3])  # (R, D, d)
    return project(cfg, target_params, rows, vocab), jnp.where(valid, labels, -1).reshape(rows.shape[0], -1)


def project(cfg: ObjectiveConfig, target_params, rows, vocab):
    """The head's rows (..., d) -> draft logits (..., V), or (..., K) over a reduced vocabulary."""
    if vocab is None:
        return Transformer(cfg.target).apply({"params": target_params}, rows, method=Transformer.logits)
    table = output_rows(cfg.target, target_params, vocab["d2t"])
    return jax.lax.dot_general(rows, table, (((rows.ndim - 1,), (1,)), ((), ()))).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "budgets", "lookup"))
def validation_counts(head_params, target_params, tokens, lengths, prompt_lens, features, vocab, *,
                      cfg: ObjectiveConfig, budgets: tuple, lookup: int = 0):
    """Per-sequence sums over its valid anchors, each (B,): {"anchors", "hit1" (depth-1 top-1
    hits), "chain" (accepted tokens of the full-depth chain), "tree_N" for each N in budgets, and
    with lookup = L > 0 (or 'all': N-1) "tree_N_lookup" (up to L of the N nodes a prompt-lookup
    chain, as decoding builds it from the prompt and answer up to the anchor: the text's match, else
    the head's answer n-gram table where it ships one, as many nodes as `lookup.branch_nodes` gives
    the row; lookup.py, ngrams.py)}."""
    b = tokens.shape[0]
    anchors, counted, logits, labels = anchor_logits(head_params, target_params, tokens, lengths, prompt_lens,
                                                     features, vocab, cfg)
    num_anchors = anchors.shape[1]
    column_ids = None if vocab is None else vocab["d2t"]
    to_target = (lambda ids: ids) if vocab is None else (lambda ids: jnp.take(column_ids, ids))  # noqa: E731
    per_seq = lambda x: jnp.sum((x * counted).reshape(b, num_anchors), axis=1)  # noqa: E731
    hits = to_target(jnp.argmax(logits, axis=-1)) == labels  # (R, D)
    out = {"anchors": per_seq(jnp.ones_like(counted, jnp.int32)), "hit1": per_seq(hits[:, 0]),
           "chain": per_seq(jnp.sum(jnp.cumprod(hits, axis=1), axis=1))}
    roots = jnp.take_along_axis(tokens, anchors, axis=1).reshape(-1)
    if lookup:  # what decoding's history holds at this round: the sequence up to the root (no later token is read)
        history = jnp.repeat(tokens, num_anchors, axis=0)  # (R, L)
        longest = max(lookup_nodes(lookup, n, min(labels.shape[1], n - 1)) for n in budgets)
        source, forced = branch_continuations(history, anchors.reshape(-1), max(longest, 1), head_params,
                                              cfg.head.ngram_orders)
    for n in budgets:
        depth = min(labels.shape[1], n - 1)
        nodes = lookup_nodes(lookup, n, depth) if lookup else 0
        variants = [("", 0)] + ([("_lookup", nodes)] if 0 < nodes < n and nodes <= depth else [])
        for suffix, forced_nodes in variants:
            tree_cfg = TreeConfig(budget=n, width=VAL_WIDTH, depth=depth, lookup=forced_nodes)
            tree = build_tree(roots, logits[:, :depth], tree_cfg, forced[:, :forced_nodes] if forced_nodes else None,
                              column_ids, branch_nodes(source, forced_nodes) if forced_nodes else None)
            out[f"tree_{n}{suffix}"] = per_seq(accepted_depth(tree.tokens, tree.depths, tree.mask, labels))
    return out


def validate(head_params, target_params, vocab, cfg: ObjectiveConfig, batches, budgets=VAL_BUDGETS, *,
             lookup: int = 0, groups=None) -> dict:
    """batches: iterable of FeatureBatch (the validation split) -> {"anchors", "acc1",
    "tau_chain", "tau_N" for each budget, and "tau_N_lookup" with lookup > 0} (tau includes the
    bonus token). groups: a name per sequence, in the order the batches hold them (e.g. the prompt
    set): then {"all": that dict, name: the same over that group's sequences, ...}."""
    totals, names = {}, iter(groups) if groups is not None else None
    for batch in batches:
        got = jax.device_get(validation_counts(head_params, target_params, batch.tokens, batch.lengths,
                                               batch.prompt_lens, batch.features, vocab, cfg=cfg,
                                               budgets=tuple(budgets), lookup=lookup))
        for row in range(batch.tokens.shape[0]):
            for group in ("all",) + (() if names is None else (next(names),)):
                total = totals.setdefault(group, {})
                for k, v in got.items():
                    total[k] = total.get(k, 0) + int(v[row])
    out = {group: _summary(total) for group, total in totals.items()}
    if groups is None:
        return out.get("all", _summary({}))
    return out


def _summary(total: dict) -> dict:
    n = max(total.get("anchors", 0), 1)
    out = {"anchors": total.get("anchors", 0), "acc1": round(total.get("hit1", 0) / n, 4),
           "tau_chain": round(1 + total.get("chain", 0) / n, 4)}
    for k in sorted((k for k in total if k.startswith("tree_")), key=lambda k: (int(k.split("_")[1]), k)):
        out["tau_" + k[len("tree_"):]] = round(1 + total[k] / n, 4)
    return out


def draft_vocabulary(data, indices, vocab_size: int, k: int) -> np.ndarray:
    """(K,) int32: the K most frequent response tokens of the sequences `indices`, most frequent
    first (ties to the lower id)."""
    counts = np.zeros(vocab_size, np.int64)
    for i in indices:
        np.add.at(counts, data.tokens[i][data.prompt_lens[i]:], 1)
    order = np.lexsort((np.arange(vocab_size), -counts))
    return order[:k].astype(np.int32)


def widen_draft_vocabulary(d2t: np.ndarray, data, indices, vocab_size: int, k: int) -> np.ndarray:
    """(k,) int32: `d2t` unchanged, then the most frequent response tokens of `indices` it lacks (ties to the
    lower id). A head trained over `d2t` keeps its logits for those ids (its output layer is the target's LM
    head: a draft id only names the row to score); the new ids start untrained (on the SmolLM2 head, widened
    8192 -> 16384 without training, validation tau with the branch 4.356 against 4.357, docs/training.md 16)."""
    d2t = np.asarray(d2t, np.int32)
    if not len(d2t) <= k <= vocab_size:
        raise ValueError(f"cannot widen a draft vocabulary of {len(d2t)} ids to {k} (vocabulary {vocab_size})")
    order = draft_vocabulary(data, indices, vocab_size, vocab_size)
    return np.concatenate([d2t, order[~np.isin(order, d2t)][: k - len(d2t)]]).astype(np.int32)


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


@dataclasses.dataclass
class ValidationSplit:
    """The cached validation sequences of a training config, for the scripts that score heads on them."""

    cfg: object  # the training config
    model: object  # the loaded target
    data: object  # its Sequences
    store: object  # its FeatureStore
    indices: np.ndarray  # (S,) the cached validation sequences, in cache order

    def batches(self, taps, size: int = 4):
        for i in range(0, len(self.indices), size):
            yield self.store.batch(self.data, self.indices[i : i + size], self.cfg.train.max_length, taps)

    def sets(self) -> list:
        """The prompt set of each sequence, in order."""
        return [prompt_set(self.data.keys[i]) for i in self.indices]


def open_validation(config_path, max_sequences: int | None = None) -> ValidationSplit:
    """The validation split of a training config with a features section (UserError: none cached yet)."""
    from jetspec_jax.errors import UserError
    from jetspec_jax.loading import load_model
    from jetspec_jax.train.config import read_config
    from jetspec_jax.train.feature_store import FeatureStore
    from jetspec_jax.train.features import CacheSpec, is_validation
    from jetspec_jax.train.shards import read_sequences

    cfg = read_config(config_path)
    if cfg.features is None:
        raise UserError(f"{config_path} has no features section")
    model = load_model(cfg.target)
    data = read_sequences(cfg.data.dir)
    store = FeatureStore.open(cfg.features.dir, CacheSpec.of(cfg, model.config.hidden_size), data)
    val = np.array([i for i in store.cached() if is_validation(data.keys[i])], np.int64)[:max_sequences or None]
    if not len(val):
        raise UserError(f"{cfg.features.dir}: no validation sequence is cached yet")
    return ValidationSplit(cfg, model, data, store, val)


def scoring_head(path, target_config):
    """A head directory, checked against the target -> (head config, params without d2t, vocab tables
    or None, the ObjectiveConfig that scores it)."""
    from jetspec_jax.head import check_head_fits
    from jetspec_jax.loading.head_io import load_head_dir

    head_cfg, params = load_head_dir(path)
    check_head_fits(head_cfg, target_config)
    params = dict(params)
    d2t = params.pop("d2t", None)
    vocab = None if d2t is None else vocab_tables(np.asarray(d2t), target_config.vocab_size)
    return head_cfg, params, vocab, ObjectiveConfig(target=target_config, head=head_cfg)
