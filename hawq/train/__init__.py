"""Finetuning stage: QAT with distillation, exact resume from pickle-free checkpoints, torchrun."""

from hawq.train.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from hawq.train.config import DistillConfig, TrainConfig
from hawq.train.data import make_train_loader
from hawq.train.loop import lr_at, train
from hawq.train.metrics import plot_history, read_metrics, write_history

__all__ = ["DistillConfig", "TrainConfig", "train", "lr_at", "make_train_loader", "plot_history",
           "read_metrics", "write_history", "checkpoint_paths", "load_checkpoint", "save_checkpoint"]
