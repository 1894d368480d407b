"""Conversion recipes: plan (ops per layer, output specs) and streaming execution."""
