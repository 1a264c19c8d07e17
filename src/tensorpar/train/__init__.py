"""Training: tensor + sequence + data parallel, with sharded checkpoints that load at any degree."""

from tensorpar.train.checkpoint import save_checkpoint
from tensorpar.train.export import export_hf
from tensorpar.train.trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer", "save_checkpoint", "export_hf"]
