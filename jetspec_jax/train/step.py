"""The jitted training step: loss, gradients, clipped AdamW with warm-up + cosine decay.

    state = init_train_state(spec, head_params)
    state, metrics = train_step(state, target_params, tokens, lengths, prompt_lens, spec=spec)

Only the head's parameters train; the target's are an ordinary (not donated) argument. The anchor
RNG of step s is `fold_in(key(seed), s)`, so a resumed run draws the same anchors.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jetspec_jax.train.objective import ObjectiveConfig, anchor_loss


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step (a change recompiles it)."""

    objective: ObjectiveConfig
    steps: int
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    seed: int = 0


@struct.dataclass
class TrainState:
    step: jax.Array  # () int32: optimizer steps taken
    params: dict  # the head's params (DraftHead layout)
    opt_state: optax.OptState


def learning_rate(spec: StepConfig):
    """Linear warm-up from 0 to lr, then cosine decay to lr * min_lr_ratio at `steps`."""
    warmup = min(spec.warmup_steps, max(spec.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=spec.lr, warmup_steps=warmup,
        decay_steps=max(spec.steps, warmup + 1), end_value=spec.lr * spec.min_lr_ratio)


def _decay_mask(params):
    """Weight decay on kernels only (not on norm scales or biases, whatever their rank)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def make_optimizer(spec: StepConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(spec.clip_norm),
        optax.adamw(learning_rate(spec), weight_decay=spec.weight_decay, mask=_decay_mask),
    )


def init_train_state(spec: StepConfig, head_params) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=head_params,
                      opt_state=make_optimizer(spec).init(head_params))


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def train_step(state: TrainState, target_params, tokens, lengths, prompt_lens, cached=None, vocab=None, *,
               spec: StepConfig):
    """tokens (B, L) int32; lengths, prompt_lens (B,) int32 -> (new state, metrics).
    cached, vocab: the feature-cache arrays and the draft vocabulary (see `anchor_loss`), or None.

    metrics: loss (), acc (Bs-1,) top-1 accuracy per depth, rows (), grad_norm (), lr ().
    """
    key = jax.random.fold_in(jax.random.PRNGKey(spec.seed), state.step)
    grad_fn = jax.value_and_grad(anchor_loss, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, target_params, tokens, lengths, prompt_lens, key,
                                     spec.objective, cached, vocab)
    updates, opt_state = make_optimizer(spec).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": learning_rate(spec)(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics
