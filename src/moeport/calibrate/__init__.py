"""Calibrated GPTQ, streamed: one decoder layer of the family's own transformers module at a time.

`tokens` reads the calibration file, `family` builds each layer from the checkpoint (through the
hf plan, so any stored format is decoded to float), `hessians` accumulates the inputs of every
targeted Linear, `kernel` is GPTQ itself, and `sequential` walks the layers in order, propagating
the quantized layer's outputs. The recipe (recipes/gptq.py) turns its results into plan ops.
"""
