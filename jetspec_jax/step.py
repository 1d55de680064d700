"""One speculative decoding round as a pure function: draft -> tree -> verify -> accept -> commit.

    state, out = speculative_step(params, state, config)

`config` is static (hashable); `state` is a pytree of arrays that the jitted loop donates. AR
decoding is the same round with a one-node tree (the root) and no draft head; a chain is a tree of
width 1. See DESIGN.md section 2 for the data flow of a round.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jetspec_jax.accept import accept
from jetspec_jax.cache import KVCache, commit_rows
from jetspec_jax.config import ModelConfig
from jetspec_jax.head import DraftHead, HeadConfig
from jetspec_jax.kernels import cpu_matmul
from jetspec_jax.layers import pack_linears
from jetspec_jax.lookup import branch_continuations, branch_nodes
from jetspec_jax.model import Transformer, for_cpu_decoding, output_rows
from jetspec_jax.sampling import sample_tokens
from jetspec_jax.tree import Tree, TreeConfig, build_tree


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Everything about a decoding run that decides shapes or code paths (static under jit)."""

    target: ModelConfig
    head: HeadConfig | None = None  # None: no drafting (AR)
    tree: TreeConfig | None = None  # None: AR, one node per round
    sample: bool = False  # False compiles a greedy-only program; True handles per-row temperatures

    def __post_init__(self):
        if (self.head is None) != (self.tree is None):
            raise ValueError("a draft tree needs a draft head and a draft head needs a tree config")
        if self.tree is not None and self.tree.depth > self.head.block_size - 1:
            raise ValueError(
                f"tree depth {self.tree.depth} exceeds the head's block size - 1 "
                f"({self.head.block_size - 1})"
            )

    @property
    def budget(self) -> int:
        """N: tree nodes verified per round, root included."""
        return 1 if self.tree is None else self.tree.budget

    @property
    def depth(self) -> int:
        """D: the most draft tokens a round can accept. A tree of N nodes reaches no deeper than
        N - 1, so the head's depths past that are never drafted."""
        return 0 if self.tree is None else min(self.tree.depth, self.tree.budget - 1)

    @property
    def block_rows(self) -> int:
        """Rows of the head's block that a round runs: [root, MASK x D]. A causal block's rows
        see only earlier rows, so the rows past D change nothing and are skipped; a bidirectional
        block needs all of them."""
        return self.depth + 1 if self.head.causal else self.head.block_size

    @property
    def taps(self) -> tuple:
        return () if self.head is None else tuple(self.head.target_layer_ids)


@struct.dataclass
class SamplingParams:
    """Per-row values; changing them never recompiles."""

    temperature: jax.Array  # (B,) float32; 0 = greedy
    top_k: jax.Array  # (B,) int32; 0 = off
    top_p: jax.Array  # (B,) float32; 1 = off
    key: jax.Array  # (B,) typed PRNG keys; round r of row b uses fold_in(key[b], r)
    stop_ids: jax.Array  # (E,) int32 end-of-sequence ids, padded with -1


@struct.dataclass
class DecodeState:
    target_cache: KVCache  # lengths (B,) = c: committed tokens except the root
    head_cache: KVCache | None  # the head's context K/V for the same c positions
    root: jax.Array  # (B,) int32: last committed token, at position c, in no cache yet
    tokens: jax.Array  # (B, S) int32: generated tokens, [0, num_new) valid
    history: jax.Array  # (B, S) int32: prompt then generated tokens by position, [0, c] valid (root at c)
    num_new: jax.Array  # (B,) int32
    max_new: jax.Array  # (B,) int32
    done: jax.Array  # (B,) bool
    rounds: jax.Array  # (B,) int32: rounds taken while not done
    accept_lengths: jax.Array  # (B, S) int32: tokens emitted in each round, [0, rounds) valid
    sampling: SamplingParams


def map_rows(fn, tree, *others):
    """`jax.tree.map(fn, tree, *others)` over the per-row leaves (leading batch axis) of
    SamplingParams or DecodeState trees; the one shared leaf, the stop ids, is kept from `tree`."""
    def split(t):
        sampling = t if isinstance(t, SamplingParams) else t.sampling
        rows = sampling.replace(stop_ids=None)
        return rows if isinstance(t, SamplingParams) else t.replace(sampling=rows)

    out = jax.tree.map(fn, split(tree), *map(split, others))
    stop = tree.sampling.stop_ids if isinstance(tree, DecodeState) else tree.stop_ids
    if isinstance(out, SamplingParams):
        return out.replace(stop_ids=stop)
    return out.replace(sampling=out.sampling.replace(stop_ids=stop))


@struct.dataclass
class RoundOutput:
    emitted: jax.Array  # (B, D+1) int32: tokens this round, [0, num_emitted) valid
    num_emitted: jax.Array  # (B,) int32 (0 for rows that were already done)


def root_only_tree(root: jax.Array) -> Tree:
    """The one-node tree of AR decoding."""
    b = root.shape[0]
    return Tree(
        tokens=root[:, None].astype(jnp.int32),
        parents=jnp.full((b, 1), -1, jnp.int32),
        depths=jnp.zeros((b, 1), jnp.int32),
        mask=jnp.ones((b, 1, 1), bool),
    )


def draft_logits(params, root, head_cache: KVCache, config: DecodeConfig):
    """The head's per-depth logits for the block [root, MASK x (Bs-1)] at positions
    head_cache.lengths + (0..Bs-1): root (B,) -> logits (B, D, V), head cache. Bs is
    `config.block_rows`.

    The block's rows sit in the head cache past `lengths` as scratch; carrying the cache forward
    lets XLA update it in place.
    """
    head_cfg, target = config.head, Transformer(config.target)
    b, bs = root.shape[0], config.block_rows
    block = jnp.full((b, bs), head_cfg.mask_token_id, jnp.int32).at[:, 0].set(root)
    positions = head_cache.lengths[:, None] + jnp.arange(bs, dtype=jnp.int32)[None, :]
    embeddings = target.apply({"params": params["target"]}, block, method=Transformer.embed)
    hidden, head_cache = DraftHead(head_cfg).apply(
        {"params": params["head"]}, embeddings, positions, head_cache)
    # Row j of the block predicts the token at position c + j: rows 1..D are the draft depths.
    rows = hidden[:, 1 : 1 + config.depth]
    if head_cfg.draft_vocab_size is None:
        logits = target.apply({"params": params["target"]}, rows, method=Transformer.logits)
    else:  # logits over the K draft ids only (draft id i is target id d2t[i])
        table = draft_table(params, config)
        layout = "packed" if table.ndim == 3 else "nk"
        logits = cpu_matmul.matmul(rows.astype(table.dtype), table, layout).astype(jnp.float32)
    return logits, head_cache


def draft_table(params, config: DecodeConfig):
    """The LM-head rows of a reduced-vocabulary head's draft ids: `params["draft_table"]` when the
    caller built it once (`with_draft_table`, as `decode` does outside its loop; (K, d), or packed
    (K / PACK, d, PACK) where the CPU kernel runs), else gathered here as (K, d)."""
    if "draft_table" in params:
        return params["draft_table"]
    return output_rows(config.target, params["target"], params["head"]["d2t"])


def with_draft_table(params, config: DecodeConfig):
    """params plus "draft_table" when the head drafts over a reduced vocabulary (else unchanged),
    packed for the CPU kernel where it runs."""
    if config.head is None or config.head.draft_vocab_size is None or "draft_table" in params:
        return params
    table = draft_table(params, config)
    if cpu_matmul.active(table.dtype) and cpu_matmul.packable(*table.shape[::-1]):
        table = cpu_matmul.pack_table(table)
    return {**params, "draft_table": table}


def prepare_params(params, config: DecodeConfig):
    """Decoding params laid out for this machine, built once per loaded model (`Runner` and the
    benchmark do; `decode` works on either form, with the same outputs): on CPU, the target's and
    the head's products in the CPU kernel's packed layout (`model.for_cpu_decoding`,
    `layers.pack_linears`) and the draft table gathered and packed; elsewhere unchanged. Not for
    sharded params (a partitioner cannot split the kernel's call)."""
    out = {**params, "target": for_cpu_decoding(config.target, params["target"])}
    if params.get("head") is not None:
        out["head"] = pack_linears(params["head"])
    return with_draft_table(out, config)


def draft_tree(params, state: DecodeState, config: DecodeConfig):
    """Draft with the head and expand the logits into a static-shape tree -> (tree, head cache)."""
    if config.head is None:
        return root_only_tree(state.root), state.head_cache
    logits, head_cache = draft_logits(params, state.root, state.head_cache, config)
    return tree_from_logits(params, state, logits, config), head_cache


def tree_from_logits(params, state: DecodeState, logits, config: DecodeConfig) -> Tree:
    """The draft tree of this round from the head's logits (B, D, V or K), with the prompt-lookup
    branch when `config.tree.lookup` > 0; tokens are target ids."""
    # A reduced-vocabulary head's logit column v is target id d2t[v].
    column_ids = None if config.head.draft_vocab_size is None else params["head"]["d2t"]
    forced = nodes = None
    if config.tree.lookup:  # a continuation copied from the text so far, else from the head's answer
        # n-gram table where it ships one; rows with neither: the head's own tree
        source, forced = branch_continuations(state.history, state.target_cache.lengths, config.tree.lookup,
                                              params["head"], config.head.ngram_orders)
        nodes = branch_nodes(source, config.tree.lookup)
    return build_tree(state.root, logits, config.tree, forced, column_ids, nodes)


def target_tokens(logits, state: DecodeState, config: DecodeConfig):
    """The target's token at every node: argmax, or one independent sample per node."""
    if not config.sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    s = state.sampling
    keys = jax.vmap(jax.random.fold_in)(s.key, state.rounds)
    return sample_tokens(keys, logits, s.temperature, s.top_k, s.top_p)


def emitted_count(emitted, num_accepted, state: DecodeState):
    """How many of this round's tokens to keep: up to the first stop id, the budget left, 0 if done.

    emitted (B, D+1); num_accepted (B,) -> (B,) int32 and (B,) bool "row finished this round".
    """
    width = emitted.shape[1]
    idx = jnp.arange(width, dtype=jnp.int32)[None, :]
    valid = idx <= num_accepted[:, None]
    is_stop = jnp.any(emitted[:, :, None] == state.sampling.stop_ids[None, None, :], axis=-1) & valid
    first_stop = jnp.min(jnp.where(is_stop, idx, width), axis=1)
    count = jnp.minimum(num_accepted + 1, first_stop + 1)
    count = jnp.minimum(count, state.max_new - state.num_new)
    count = jnp.where(state.done, 0, count).astype(jnp.int32)
    finished = (first_stop < width) | (state.num_new + count >= state.max_new)
    return count, finished & ~state.done


def write_at(buffer, values, start):
    """buffer (B, S); values (B, T); start (B,) -> buffer with values at [start, start+T) per row."""
    return jax.vmap(lambda b, v, s: jax.lax.dynamic_update_slice(b, v, (s,)))(buffer, values, start)


def write_dropping(buffer, values, start):
    """write_at, but values that would land past the buffer's end are dropped (write_at clamps the
    start instead, which would move them onto earlier slots)."""
    idx = start[:, None] + jnp.arange(values.shape[1], dtype=jnp.int32)[None, :]
    return jax.vmap(lambda b, i, v: b.at[i].set(v, mode="drop"))(buffer, idx, values)


def speculative_step(params, state: DecodeState, config: DecodeConfig):
    """One round for every row of the batch. Pure; jit with `config` static and `state` donated.

    params: {"target": target params, "head": head params (absent for AR)}.
    Returns the new state and this round's emitted tokens.
    """
    tree, head_cache = draft_tree(params, state, config)
    return verify_and_commit(params, state.replace(head_cache=head_cache), tree, config)


def verify_and_commit(params, state: DecodeState, tree: Tree, config: DecodeConfig):
    """Verify `tree` with one target forward, accept the longest matching path and commit it.

    Split from drafting so that any proposal (e.g. an oracle in tests) goes through the same
    verification and commit code.
    """
    logits, features, cache = verify(params, state.target_cache, tree, config)
    return commit(params, state.replace(target_cache=cache), tree, logits, features, config)


def verify(params, cache: KVCache, tree: Tree, config: DecodeConfig):
    """The target forward over the tree's N tokens at positions c + depth, K/V written at
    [c, c + N) of the target cache -> logits (B, N, V), tapped features (B, N, taps*d) or None,
    cache."""
    c = cache.lengths
    return Transformer(config.target).apply(
        {"params": params["target"]}, tree.tokens, c[:, None] + tree.depths, cache, tree.mask,
        taps=config.taps)


def commit(params, state: DecodeState, tree: Tree, logits, features, config: DecodeConfig):
    """Accept against the verification `logits` and commit; `state.target_cache` is verify's.

    The root and the accepted nodes that were kept move to [c, c + count); the last kept token
    becomes the next root (the bonus when nothing was cut).
    """
    c = state.target_cache.lengths
    produced = target_tokens(logits, state, config)
    acc = accept(tree.tokens, tree.parents, tree.depths, tree.mask, produced, config.depth)
    count, finished = emitted_count(acc.emitted, acc.num_accepted, state)
    cache = commit_rows(state.target_cache, c[:, None] + acc.path, count)
    head_cache = state.head_cache
    if config.head is not None:
        path_features = jnp.take_along_axis(features, acc.path[:, :, None], axis=1)
        head_cache = DraftHead(config.head).apply(
            {"params": params["head"]}, path_features, c[:, None] + jnp.arange(config.depth + 1),
            head_cache, method=DraftHead.append_context)
        head_cache = head_cache.replace(lengths=cache.lengths)
    last = jnp.take_along_axis(acc.emitted, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    active = ~state.done
    state = state.replace(
        target_cache=cache,
        head_cache=head_cache,
        root=jnp.where(count > 0, last, state.root),
        tokens=write_at(state.tokens, acc.emitted, state.num_new),
        history=write_dropping(state.history, acc.emitted, c + 1),
        num_new=state.num_new + count,
        done=state.done | finished,
        rounds=state.rounds + active.astype(jnp.int32),
        accept_lengths=write_at(state.accept_lengths, jnp.where(active, count, 0)[:, None],
                                state.rounds),
    )
    return state, RoundOutput(emitted=acc.emitted, num_emitted=count)
