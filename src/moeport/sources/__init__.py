"""Lazy, memory-mapped access to checkpoints on disk."""

from moeport.sources.checkpoint import Checkpoint, TensorInfo, open_checkpoint

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]
