"""Writers that stream tensors to disk with bounded memory and atomic completion."""

from moeport.sinks.safetensors_file import SafetensorsFileWriter, TensorSpec
from moeport.sinks.sharded import ShardedWriter, save_sharded

__all__ = ["SafetensorsFileWriter", "ShardedWriter", "TensorSpec", "save_sharded"]
