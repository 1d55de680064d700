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
   depth the same when it is None.

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
from jetspec_jax.model import Transformer, init_cache
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


def projected_loss(cfg: ObjectiveConfig, target_params, hidden, labels, teacher=None):
    """Per-row loss and top-1 hit through the target's LM head, `vocab_chunk` rows at a time.

    hidden (R, d) draft rows (head-normed); labels (R,) int32; teacher (R, d) target final-normed
    rows for KL (else None) -> loss (R,) float32, correct (R,) bool (argmax == label).
    """
    target = Transformer(cfg.target)
    project = lambda h: target.apply({"params": target_params}, h[None], method=Transformer.logits)[0]  # noqa: E731

    @jax.checkpoint  # backward recomputes this chunk's logits instead of storing them
    def one_chunk(args):
        h, y, t = args  # (C, d), (C,), (C, d) or None
        logits = project(h)  # (C, V) float32
        log_q = jax.nn.log_softmax(logits, axis=-1)
        correct = jnp.argmax(logits, axis=-1) == y
        if t is None:
            loss = -jnp.take_along_axis(log_q, y[:, None], axis=-1)[:, 0]
        else:
            log_p = jax.nn.log_softmax(jax.lax.stop_gradient(project(t)), axis=-1)
            loss = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
        return loss, correct

    rows = labels.shape[0]
    chunks = (_chunk_rows(hidden, cfg.vocab_chunk), _chunk_rows(labels, cfg.vocab_chunk),
              None if teacher is None else _chunk_rows(teacher, cfg.vocab_chunk))
    loss, correct = jax.lax.map(one_chunk, chunks)
    return loss.reshape(-1)[:rows], correct.reshape(-1)[:rows]


def anchor_loss(head_params, target_params, tokens, lengths, prompt_lens, key, cfg: ObjectiveConfig):
    """Mean loss over valid (anchor, depth) rows, and metrics.

    tokens (B, L) int32 right-padded; lengths, prompt_lens (B,) int32.
    Returns (loss, {"loss", "acc" (Bs-1,) per-depth top-1 accuracy, "depth_loss" (Bs-1,) per-depth
    mean loss, "depth_rows" (Bs-1,) valid rows per depth, "rows" valid row count}).
    """
    b, length = tokens.shape
    bs = cfg.head.block_size
    features, final = jax.lax.stop_gradient(target_features(cfg, target_params, tokens))
    anchors, anchor_ok = sample_anchors(key, lengths, prompt_lens, cfg.anchors_per_seq, length)
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
    labels = jnp.take_along_axis(tokens, safe_pos.reshape(b, -1), axis=1)  # (B, A*(Bs-1))
    teacher = None
    if final is not None:  # target distribution at a+k-1 predicts x_{a+k}
        teacher = jnp.take_along_axis(final, (safe_pos - 1).reshape(b, -1)[..., None], axis=1)
        teacher = teacher.reshape(-1, final.shape[-1])
    rows = hidden[:, :, 1:].reshape(-1, hidden.shape[-1])  # (B*A*(Bs-1), d)
    loss, correct = projected_loss(cfg, target_params, rows, labels.reshape(-1), teacher)

    depth_w = jnp.ones((bs - 1,), jnp.float32)
    if cfg.loss_decay_gamma is not None:
        depth_w = jnp.exp(-jnp.arange(bs - 1, dtype=jnp.float32) / cfg.loss_decay_gamma)
    per_depth = valid.reshape(-1, bs - 1).astype(jnp.float32)  # (B*A, Bs-1)
    w = (per_depth * depth_w).reshape(-1)
    mean = jnp.sum(loss * w) / jnp.maximum(jnp.sum(w), 1e-6)
    depth_rows = jnp.sum(per_depth, axis=0)
    hits = correct.reshape(-1, bs - 1) * per_depth
    acc = jnp.sum(hits, axis=0) / jnp.maximum(depth_rows, 1.0)
    depth_loss = jnp.sum(loss.reshape(-1, bs - 1) * per_depth, axis=0) / jnp.maximum(depth_rows, 1.0)
    return mean, {"loss": mean, "acc": acc, "depth_loss": depth_loss, "depth_rows": depth_rows,
                  "rows": jnp.sum(per_depth)}
