"""Training: one accelerate-based loop (:mod:`rslib.train.loop`) that every stage builds on."""
from rslib.train.loop import (
    TrainConfig,
    TrainResult,
    batch_indices,
    epoch_permutation,
    load_trainable,
    step_seed,
    train_loop,
    trainable_state_dict,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "batch_indices",
    "epoch_permutation",
    "load_trainable",
    "step_seed",
    "train_loop",
    "trainable_state_dict",
]
