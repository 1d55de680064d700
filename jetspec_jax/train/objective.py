"""The training loss: frozen target features, random anchors, per-depth CE (or forward KL).

For a sequence x_0..x_{n-1} (prompt of length p, then the target's own response):

1. The frozen target runs over the whole padded sequence once (teacher forcing, causal mask) and
   gives the taps of every position (and, for KL, its final hidden state).
2. Up to A anchors a are drawn uniformly without replacement from [p-1, n-2]: a = p-1 is the first
   round's root (the last prompt token), and every anchor has at least one label. So every label
   is a response token.
3. The head drafts every block `[x_a, MASK x (Bs-1)]` over the context `< a` (`AnchorHead`).
4. Block row k (1..Bs-1) predicts x_{a+k} (hard-label CE) or matches the target's distribution at
   position a+k-1 (forward KL at T = 1). Row 0 (the anchor) has no loss; rows past the sequence
   end are masked; the loss is the weighted mean over valid rows, depth k weighing
   exp(-(k-1)/gamma) with `loss_decay_gamma` (early depths decide the accepted length), or every
   depth the same when it is None. A causal head may train only its first `block_rows` rows
   (`ObjectiveConfig.rows`): they are exactly the first rows of the full block, and a tree of N
   nodes never drafts deeper than N-1, so a step's cost can follow the depths trees use.

With a feature cache (features.py) the taps and the target's top-k next-token log-probs come
from disk instead of step 1, and "kl" becomes cross-entropy to that top-k (renormalised). A
reduced-vocabulary head projects onto its K draft ids only; a label outside them has no loss.

The vocabulary projection runs in row chunks under `jax.checkpoint`, so at most
`chunk x vocab` logits exist at once, in the forward and in the backward pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jetspec_jax.config import ModelConfig
from jetspec_jax.head import HeadConfig
from jetspec_jax.layers import RMSNorm
from jetspec_jax.model import Transformer, init_cache, output_rows
from jetspec_jax.train.anchor_head import AnchorHead


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Static settings of the loss (hashable: part of the jitted step's static config)."""

    target: ModelConfig
    head: HeadConfig
    anchors_per_seq: int = 64
    loss: str = "ce"  # "ce" | "kl"
    vocab_chunk: int = 512
    loss_decay_gamma: float | None = None
    block_rows: int | None = None  # rows of each block that are drafted and scored; None: all Bs

    @property
    def rows(self) -> int:
        """Rows of each anchor's block the forward runs: [x_a, MASK x (rows-1)]. A causal head's
        row k sees only rows <= k, so these rows are exactly the first rows of the full block
        (inference's `DecodeConfig.block_rows` skips the same rows); a bidirectional head needs all."""
        if self.block_rows is None:
            return self.head.block_size
        if not block_rows_fit(self.block_rows, self.head.block_size, self.head.causal):
            raise ValueError(f"block_rows {self.block_rows} must be in [2, {self.head.block_size}] and needs a causal "
                             "head (a bidirectional row sees the whole block)")
        return self.block_rows


def block_rows_fit(block_rows: int, block_size: int, causal: bool) -> bool:
    """Whether a head may train only its first `block_rows` rows: a causal head, 2 <= rows <= Bs."""
    return 2 <= block_rows <= block_size and causal


def target_features(cfg: ObjectiveConfig, target_params, tokens):
    """tokens (B, L) int32 -> features (B, L, taps*d), and for KL the target's final-normed
    hidden states (B, L, d) (else None). One causal forward from an empty cache of L slots.

    Layers above the deepest tap cannot change the taps, so the forward stops there (the default
    tap of a one-layer head is L//2: half the target's cost).
    """
    b, length = tokens.shape
    taps = tuple(cfg.head.target_layer_ids)
    last = cfg.target.num_layers - 1
    all_taps = taps + (last,) if cfg.loss == "kl" else taps
    depth = max(all_taps) + 1
    target = cfg.target.replace(num_layers=depth)
    used = {k: v for k, v in target_params.items() if not (k.startswith("layers_") and int(k[7:]) >= depth)}
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (b, length, length))
    _, tapped, _ = Transformer(target).apply(
        {"params": used}, tokens, positions, init_cache(target, b, length), causal,
        taps=all_taps, with_logits=False)
    if cfg.loss != "kl":
        return tapped, None
    d = cfg.target.hidden_size
    final = RMSNorm(cfg.target.rms_norm_eps, jnp.dtype(cfg.target.dtype)).apply(
        {"params": target_params["final_norm"]}, tapped[..., -d:])
    return tapped[..., :-d], final


def sample_anchors(key, lengths, prompt_lens, num_anchors: int, length: int):
    """Anchors drawn uniformly without replacement from [p-1, n-2] of each row.

    lengths, prompt_lens (B,) int32 -> anchors (B, A) int32, valid (B, A) bool (False where a row
    has fewer than A candidates; those anchors point at position 0 and carry no loss).
    """
    pos = jnp.arange(length, dtype=jnp.int32)[None, :]
    candidate = (pos >= prompt_lens[:, None] - 1) & (pos <= lengths[:, None] - 2)  # (B, L)
    scores = jnp.where(candidate, jax.random.uniform(key, candidate.shape), -1.0)
    top, anchors = jax.lax.top_k(scores, min(num_anchors, length))  # (B, A)
    valid = top >= 0
    return jnp.where(valid, anchors, 0).astype(jnp.int32), valid


def _chunk_rows(x, chunk: int):
    """(R, ...) -> (R_pad // chunk, chunk, ...) with zero rows appended."""
    pad = -x.shape[0] % chunk
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(-1, chunk, *x.shape[1:])


def projected_loss(cfg: ObjectiveConfig, target_params, hidden, labels, teacher=None, *, table=None,
                   soft=None):
    """Per-row loss and top-1 hit through the LM head, `vocab_chunk` rows at a time.

    hidden (R, d) draft rows (head-normed); labels (R,) int32 in the head's output ids (for a
    reduced-vocabulary head draft ids, -1 for a label outside the draft vocabulary: no loss, never
    a hit). Soft labels, one of: teacher (R, d) target final-normed rows (forward KL over the full
    vocabulary), or soft = (ids (R, k) output ids or -1, logp (R, k)): the target's top-k
    next-token log-probs, renormalised over the ids the head can output (cross-entropy to them).
    table: (K, d) LM-head rows of the draft vocabulary, or None (the target's full LM head).
    -> loss (R,) float32, correct (R,) bool (argmax == label), has_loss (R,) bool.
    """
    target = Transformer(cfg.target)
    full = lambda h: target.apply({"params": target_params}, h[None], method=Transformer.logits)[0]  # noqa: E731
    project = full if table is None else (
        lambda h: jax.lax.dot_general(h, table, (((1,), (1,)), ((), ()))).astype(jnp.float32))

    @jax.checkpoint  # backward recomputes this chunk's logits instead of storing them
    def one_chunk(args):
        h, y, t, s_ids, s_logp = args  # (C, d), (C,), (C, d) or None, (C, k) or None, (C, k) or None
        logits = project(h)  # (C, V or K) float32
        log_q = jax.nn.log_softmax(logits, axis=-1)
        correct = (jnp.argmax(logits, axis=-1) == y) & (y >= 0)
        if t is not None:
            log_p = jax.nn.log_softmax(jax.lax.stop_gradient(full(t)), axis=-1)
            return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1), correct, jnp.ones_like(correct)
        if s_ids is not None:
            p = jnp.where(s_ids >= 0, jnp.exp(s_logp), 0.0)
            mass = jnp.sum(p, axis=-1)
            p = p / jnp.maximum(mass, 1e-30)[:, None]
            picked = jnp.take_along_axis(log_q, jnp.maximum(s_ids, 0), axis=-1)
            return -jnp.sum(p * picked, axis=-1), correct, mass > 0
        loss = -jnp.take_along_axis(log_q, jnp.maximum(y, 0)[:, None], axis=-1)[:, 0]
        return jnp.where(y >= 0, loss, 0.0), correct, y >= 0

    rows = labels.shape[0]
    chunk = lambda x: None if x is None else _chunk_rows(x, cfg.vocab_chunk)  # noqa: E731
    s_ids, s_logp = soft if soft is not None else (None, None)
    chunks = (chunk(hidden), chunk(labels), chunk(teacher), chunk(s_ids), chunk(s_logp))
    loss, correct, has_loss = jax.lax.map(one_chunk, chunks)
    return loss.reshape(-1)[:rows], correct.reshape(-1)[:rows], has_loss.reshape(-1)[:rows]


def anchor_hidden(head_params, target_params, tokens, lengths, prompt_lens, features, anchors, anchor_ok,
                  cfg: ObjectiveConfig):
    """The head's block rows for every anchor and what they must predict.

    features (B, L, taps*d); anchors, anchor_ok (B, A) -> hidden (B, A, R-1, d) rows 1.. of each
    block, labels (B, A, R-1) int32 target ids x_{a+k}, valid (B, A, R-1) bool (label inside the
    sequence), label_pos (B, A, R-1) int32 (clipped into the sequence); R = cfg.rows.
    """
    b, length = tokens.shape
    bs = cfg.rows
    a = anchors.shape[1]
    block = jnp.full((b, a, bs), cfg.head.mask_token_id, jnp.int32)
    block = block.at[:, :, 0].set(jnp.take_along_axis(tokens, anchors, axis=1))
    embed = Transformer(cfg.target).apply({"params": target_params}, block.reshape(b, a * bs),
                                          method=Transformer.embed).reshape(b, a, bs, -1)
    hidden = AnchorHead(cfg.head).apply({"params": head_params}, features, embed, anchors,
                                        method=AnchorHead.anchor_blocks)  # (B, A, Bs, d)
    label_pos = anchors[..., None] + jnp.arange(1, bs, dtype=jnp.int32)  # (B, A, Bs-1)
    valid = anchor_ok[..., None] & (label_pos < lengths[:, None, None])
    safe_pos = jnp.minimum(label_pos, length - 1)
    labels = jnp.take_along_axis(tokens, safe_pos.reshape(b, -1), axis=1).reshape(b, a, bs - 1)
    return hidden[:, :, 1:], labels, valid, safe_pos


def anchor_loss(head_params, target_params, tokens, lengths, prompt_lens, key, cfg: ObjectiveConfig,
                cached=None, vocab=None):
    """Mean loss over valid (anchor, depth) rows, and metrics.

    tokens (B, L) int32 right-padded; lengths, prompt_lens (B,) int32.
    cached: {"features" (B, L, taps*d), "topk_ids" (B, L, k), "topk_logp" (B, L, k)} from the
    feature cache (the target does not run), or None (the frozen target runs here).
    vocab: {"d2t" (K,) draft id -> target id, "t2d" (V,) target id -> draft id or -1} for a
    reduced-vocabulary head, or None.
    Returns (loss, {"loss", "acc" (R-1,) per-depth top-1 accuracy, "depth_loss" (R-1,) per-depth
    mean loss, "depth_rows" (R-1,) valid rows per depth, "rows" valid row count}); R = cfg.rows.
    """
    b, length = tokens.shape
    bs = cfg.rows
    if cached is None:
        features, final = jax.lax.stop_gradient(target_features(cfg, target_params, tokens))
    else:
        features, final = cached["features"], None
    anchors, anchor_ok = sample_anchors(key, lengths, prompt_lens, cfg.anchors_per_seq, length)
    hidden, labels, valid, safe_pos = anchor_hidden(head_params, target_params, tokens, lengths, prompt_lens,
                                                    features, anchors, anchor_ok, cfg)
    to_out = (lambda ids: ids) if vocab is None else (lambda ids: jnp.take(vocab["t2d"], ids))  # noqa: E731
    table = None if vocab is None else output_rows(cfg.target, target_params, vocab["d2t"])
    teacher = soft = None
    if final is not None:  # target distribution at a+k-1 predicts x_{a+k}
        teacher = jnp.take_along_axis(final, (safe_pos - 1).reshape(b, -1)[..., None], axis=1)
        teacher = teacher.reshape(-1, final.shape[-1])
    elif cfg.loss == "kl":  # the cached top-k of the target at a+k-1
        gather = lambda x: jnp.take_along_axis(x, (safe_pos - 1).reshape(b, -1)[..., None], axis=1)  # noqa: E731
        soft = (to_out(gather(cached["topk_ids"])).reshape(-1, cached["topk_ids"].shape[-1]),
                gather(cached["topk_logp"]).reshape(-1, cached["topk_logp"].shape[-1]))
    rows = hidden.reshape(-1, hidden.shape[-1])  # (B*A*(Bs-1), d)
    loss, correct, has_loss = projected_loss(cfg, target_params, rows, to_out(labels.reshape(-1)), teacher,
                                             table=table, soft=soft)

    depth_w = jnp.ones((bs - 1,), jnp.float32)
    if cfg.loss_decay_gamma is not None:
        depth_w = jnp.exp(-jnp.arange(bs - 1, dtype=jnp.float32) / cfg.loss_decay_gamma)
    per_depth = valid.reshape(-1, bs - 1).astype(jnp.float32)  # (B*A, Bs-1)
    w = (per_depth * depth_w).reshape(-1) * has_loss
    mean = jnp.sum(loss * w) / jnp.maximum(jnp.sum(w), 1e-6)
    depth_rows = jnp.sum(per_depth, axis=0)
    hits = correct.reshape(-1, bs - 1) * per_depth
    acc = jnp.sum(hits, axis=0) / jnp.maximum(depth_rows, 1.0)
    lossy = per_depth * has_loss.reshape(-1, bs - 1)
    depth_loss = jnp.sum(loss.reshape(-1, bs - 1) * lossy, axis=0) / jnp.maximum(jnp.sum(lossy, axis=0), 1.0)
    return mean, {"loss": mean, "acc": acc, "depth_loss": depth_loss, "depth_rows": depth_rows,
                  "rows": jnp.sum(per_depth)}
