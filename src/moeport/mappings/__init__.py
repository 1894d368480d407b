"""Declarative, invertible, quantization-aware mappings between tensor layouts."""
