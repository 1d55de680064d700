"""The draft head's training forward: every anchor block of a sequence in one pass.

At inference the head drafts one block `[x_a, MASK x (Bs-1)]` at positions `a .. a+Bs-1` over the
context features of positions `< a`. Training scores many anchors `a` of the same sequence; running
the head once per anchor would recompute the context keys each time. Instead all blocks are one
batch of queries, and each query attends to

    context keys j (projected target features of the whole sequence)   iff  j < a
    block keys of its own block                                         iff  causal: offset' <= offset
                                                                             (bidirectional: all)

Worked example, anchors (2, 4), Bs = 2, causal; sequence positions 0..5 (c = context key,
b = block key of the same anchor):

    query (a=2, row 0): c0 c1 | b0          query (a=4, row 0): c0 c1 c2 c3 | b0
    query (a=2, row 1): c0 c1 | b0 b1       query (a=4, row 1): c0 c1 c2 c3 | b0 b1

Scores against the context (B, H, A*Bs, L) and within each block (B, H, A, Bs, Bs) are kept apart
(a block never sees another block) and normalised by one softmax over both, which is exactly the
inference attention over `[context ; block]`. `AnchorHead` is `DraftHead` plus this method, so the
parameter tree is DraftHead's and trained params load into it (and into `save_head_dir`) unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jetspec_jax.head import DraftHead, block_attention_mask
from jetspec_jax.layers import rope_tables


def anchor_attention(q, ctx_k, ctx_v, blk_k, blk_v, ctx_visible, blk_visible):
    """q (B, A, Bs, Hq, Dh); ctx_k/v (B, L, Hkv, Dh); blk_k/v (B, A, Bs, Hkv, Dh);
    ctx_visible (B, A, L) bool; blk_visible (Bs, Bs) bool -> (B, A, Bs, Hq, Dh).

    Same arithmetic as `tree_attention_reference` (float32 scores, scale Dh**-0.5, query head h
    reads kv head h // (Hq / Hkv)).
    """
    b, a, bs, hq, dh = q.shape
    hkv = ctx_k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, a, bs, hkv, hq // hkv, dh)
    scale = dh**-0.5
    s_ctx = jnp.einsum("bathgd,blhd->bhgatl", qg, ctx_k.astype(jnp.float32)) * scale
    s_blk = jnp.einsum("bathgd,bauhd->bhgatu", qg, blk_k.astype(jnp.float32)) * scale
    s_ctx = jnp.where(ctx_visible[:, None, None, :, None, :], s_ctx, -jnp.inf)
    s_blk = jnp.where(blk_visible, s_blk, -jnp.inf)  # every row sees its own token: no empty row
    probs = jax.nn.softmax(jnp.concatenate([s_ctx, s_blk], axis=-1), axis=-1)
    p_ctx, p_blk = probs[..., : s_ctx.shape[-1]], probs[..., s_ctx.shape[-1]:]
    out = (jnp.einsum("bhgatl,blhd->bathgd", p_ctx, ctx_v.astype(jnp.float32))
           + jnp.einsum("bhgatu,bauhd->bathgd", p_blk, blk_v.astype(jnp.float32)))
    return out.reshape(b, a, bs, hq, dh).astype(q.dtype)


class AnchorHead(DraftHead):
    """DraftHead with `anchor_blocks`, the many-anchors training forward (same parameters)."""

    def anchor_blocks(self, features, block_embeddings, anchors):
        """features (B, L, taps*d) of target positions 0..L-1; block_embeddings (B, A, Bs, d)
        (embedded `[x_a, MASK x (Bs-1)]` per anchor); anchors (B, A) int32
        -> hidden (B, A, Bs, d) after the head's final norm, as `DraftHead.__call__` gives for
        each block over the context `features[:, :a]`.
        """
        c = self.config
        dtype = jnp.dtype(c.dtype)
        b, a, bs, d = block_embeddings.shape
        length = features.shape[1]
        ctx = self.hidden_norm(self.fc(features.astype(dtype)))  # (B, L, d)
        ctx_pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        ctx_cos, ctx_sin = rope_tables(ctx_pos, c.head_dim, c.rope_theta)  # (B, L, Dh)
        blk_pos = (anchors[..., None] + jnp.arange(bs, dtype=jnp.int32)).reshape(b, a * bs)
        blk_cos, blk_sin = rope_tables(blk_pos, c.head_dim, c.rope_theta)  # (B, A*Bs, Dh)
        ctx_visible = jnp.arange(length)[None, None, :] < anchors[..., None]  # (B, A, L)
        blk_visible = block_attention_mask(bs, c.causal)  # (Bs, Bs)

        x = block_embeddings.astype(dtype).reshape(b, a * bs, d)
        for layer in self.layers:
            attn = layer.attn
            ctx_k, ctx_v = attn.keys_values(ctx, ctx_cos, ctx_sin)  # (B, L, Hkv, Dh); no input_norm
            h = layer.input_norm(x)
            q, blk_k, blk_v = attn.projections(h, blk_cos, blk_sin)  # (B, A*Bs, Hq or Hkv, Dh)
            split = lambda t: t.reshape(b, a, bs, *t.shape[2:])  # noqa: E731
            out = anchor_attention(split(q), ctx_k, ctx_v, split(blk_k), split(blk_v),
                                   ctx_visible, blk_visible)
            x = x + attn.o_proj(out.reshape(b, a * bs, -1))
            x = x + layer.mlp(layer.post_attn_norm(x))
        return self.norm(x).reshape(b, a, bs, d)
