"""moeport: convert Mixture-of-Experts checkpoints between layouts and quantization formats."""

from moeport.errors import MoeportError

__all__ = ["MoeportError", "__version__"]
__version__ = "0.1.0"
