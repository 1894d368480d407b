"""The family's own transformers modules, one decoder layer at a time.

The whole model is built on `meta` from the checkpoint's config (no memory, no init), so each
decoder layer's class, the rotary embedding and the causal mask are transformers' own for the
family (MLA's rotary details, dense vs MoE layers...). A layer gets real tensors only while it is
calibrated: they come from the hf plan in the transformers-v5 ("fused") names, decoded to float32
by moeport's codecs, so FP8, MXFP4 or GPTQ sources work as BF16 ones do.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from moeport.calibrate.hessians import expert_count
from moeport.convert.plan import Unit, run_unit
from moeport.detect.detection import Detection
from moeport.errors import MoeportError
from moeport.sources.checkpoint import Checkpoint


class FamilyModel:
    """Embeddings, rotary/mask inputs and decoder layers of `ck`, built from its config."""

    def __init__(self, ck: Checkpoint, det: Detection, device: str = "cpu"):
        from transformers import AutoConfig, AutoModelForCausalLM

        from moeport.recipes.hf import build_hf  # recipes build on the plan; deferred: no cycle

        self.ck, self.det, self.device = ck, det, device
        if det.naming.stacks:  # calibration feeds one decoder's hidden states through its layers
            where = ", ".join(f"'{p}'" for p in [det.naming.main, *(p for p, _ in det.naming.stacks)])
            raise MoeportError(
                f"--method gptq: {ck.root} holds several expert stacks ({where}) and calibration runs one "
                "decoder's layers; quantize with RTN (leave out --method gptq)"
            )
        try:
            cfg = AutoConfig.from_pretrained(ck.root, local_files_only=True).get_text_config()
        except (OSError, ValueError, KeyError) as exc:
            raise MoeportError(f"{ck.root}/config.json: transformers cannot read it ({exc})") from None
        if hasattr(cfg, "quantization_config"):  # weights reach the layer decoded to float32
            del cfg.quantization_config
        cfg._attn_implementation = "sdpa"  # eager attention without a mask is not causal
        cfg._experts_implementation = "eager"
        self.config = cfg
        if det.family.fused is None:
            raise MoeportError(f"--method gptq: {det.family.title} has no transformers (fused) layout to run")
        if getattr(cfg, "is_encoder_decoder", False):  # Switch, NLLB-MoE: no causal-LM layer stack to walk
            raise MoeportError(
                f"--method gptq: {det.family.title} is an encoder-decoder; calibration walks the layers of "
                "a decoder-only language model (leave out --method gptq for RTN)"
            )
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(cfg)
        except (ValueError, KeyError, TypeError) as exc:
            why = str(exc).splitlines()[0].split(". ")[0]  # its first sentence: one line
            raise MoeportError(f"--method gptq: transformers cannot build {ck.root} ({why})") from None
        inner = model.get_decoder()
        layers = getattr(inner, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) != (det.num_layers or len(layers)):
            # DBRX keeps its blocks under `blocks`: a walk over other layers than the checkpoint's
            # would calibrate nothing (or the wrong ones)
            raise MoeportError(
                f"--method gptq: transformers' {type(inner).__name__} holds no list of the {det.num_layers} "
                f"decoder layers of {ck.root} to walk; quantize with RTN (leave out --method gptq)"
            )
        self.layers: nn.ModuleList = layers
        for layer in self.layers:
            expert_count(layer)  # refuses expert modules GPTQ cannot calibrate, before any work
        self.rotary = type(inner.rotary_emb)(config=cfg).to(device) if hasattr(inner, "rotary_emb") else None
        plan, _ = build_hf(ck, det, "fused", torch.float32, device=device)
        self.units: dict[int | None, list[Unit]] = defaultdict(list)
        for unit in plan.units:
            self.units[unit.layer].append(unit)

    @property
    def num_layers(self) -> int:
        # not config.num_hidden_layers: LongCat-Flash's counts its two attention sublayers per layer
        return len(self.layers)

    def embedding(self) -> torch.Tensor:
        """The checkpoint's embed_tokens table (float32, on the device): states[i] = table[ids[i]]."""
        for unit in self.units[None]:
            name = next((o for o in unit.op.outputs if o.endswith("embed_tokens.weight")), None)
            if name is not None:
                return dict(run_unit(unit, self.ck))[name].to(self.device)
        raise MoeportError(f"{self.ck.root}: no embed_tokens.weight to start the calibration from")

    def layer_inputs(self, states: torch.Tensor) -> dict[str, object]:
        """Keyword arguments every decoder layer takes besides the hidden states, computed as the
        family's model computes them (its rotary embedding, transformers' causal mask)."""
        from transformers import masking_utils

        batch, seq = states.shape[:2]
        position_ids = torch.arange(seq, device=states.device).unsqueeze(0).expand(batch, -1)
        sliding = getattr(self.config, "sliding_window", None) is not None
        make_mask = (
            masking_utils.create_sliding_window_causal_mask if sliding else masking_utils.create_causal_mask
        )
        mask = make_mask(
            config=self.config,
            inputs_embeds=states,
            attention_mask=None,
            cache=None,
            position_ids=position_ids,
        )
        kwargs: dict[str, object] = {"attention_mask": mask, "position_ids": position_ids}
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(states, position_ids=position_ids)
        return kwargs

    def load_layer(self, layer: int) -> nn.Module:
        """Decoder layer `layer` with its tensors from the checkpoint (float32, strict)."""
        prefix = self.det.naming.prefix(layer)
        tensors = {}
        for unit in self.units.get(layer, []):
            for name, t in run_unit(unit, self.ck):
                tensors[name.removeprefix(prefix)] = t.to(self.device)
        module = self.layers[layer]
        try:
            module.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as exc:
            raise MoeportError(
                f"{prefix}*: the checkpoint's tensors do not fit transformers' "
                f"{type(module).__name__} ({str(exc).splitlines()[-1].strip()})"
            ) from None
        for name, buf in module.named_buffers():  # non-persistent buffers stay on meta
            if buf.is_meta:
                raise MoeportError(f"{prefix}{name}: a buffer transformers computes at init; not supported")
        return module.eval()

    def unload(self, layer: int) -> None:
        """Give the layer's memory back (its parameters return to `meta`)."""
        self.layers[layer].to("meta")

    def forward(self, module: nn.Module, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The layer's outputs for each chunk of states [samples, T, H] (calibrate/states.py)."""
        with torch.no_grad():
            for x in chunks:
                out = module(x, **self.layer_inputs(x))
                yield out[0] if isinstance(out, tuple) else out
