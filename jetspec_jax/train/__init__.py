"""Training the draft head on the target's own answers (DESIGN.md section 3).

    python -m jetspec_jax.train --config configs/smollm2-135m-causal.yaml

Stages: `data.regenerate` (the target answers the training prompts; token shards on disk),
then `trainer.train` (frozen target features, many anchors per sequence, `objective.anchor_loss`,
resumable orbax checkpoints, the head exported with `save_head_dir`).
"""

from jetspec_jax.train.anchor_head import AnchorHead, anchor_attention
from jetspec_jax.train.config import TrainConfig, parse_config, read_config
from jetspec_jax.train.data import chat_prompts, regenerate
from jetspec_jax.train.objective import ObjectiveConfig, anchor_loss, sample_anchors, target_features
from jetspec_jax.train.shards import Sequences, read_sequences, write_shard
from jetspec_jax.train.step import StepConfig, TrainState, init_train_state, train_step
from jetspec_jax.train.trainer import head_config, train

__all__ = [
    "AnchorHead", "ObjectiveConfig", "Sequences", "StepConfig", "TrainConfig", "TrainState",
    "anchor_attention", "anchor_loss", "chat_prompts", "head_config", "init_train_state",
    "parse_config", "read_config", "read_sequences", "regenerate", "sample_anchors",
    "target_features", "train", "train_step", "write_shard",
]
