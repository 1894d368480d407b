"""Name the storage format of one weight from its companion tensors (headers only, no data).

The formats declare how they are recognised next to their codecs (codecs.fp8, codecs.gptq, ...);
codecs.registry.classify asks them in order. Kept here under its old names for callers of detect.
"""

from moeport.codecs.format import PASSIVE_PARTS, ExpertFormat, Part
from moeport.codecs.registry import classify

__all__ = ["PASSIVE_PARTS", "ExpertFormat", "Part", "classify"]
