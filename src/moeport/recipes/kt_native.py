"""Targets for kt-kernel's native methods, whose loaders read a Hugging Face folder directly.

kt-kernel's `NativeMoEWrapper` loads routed experts straight from a checkpoint folder
(python/utils/loader.py: `CompressedSafeTensorLoader` for RAWINT4, `FP8SafeTensorLoader` for FP8
and FP8_PERCHANNEL, `BF16SafeTensorLoader` for BF16), and the GPU side (SGLang with kt-kernel)
loads the other weights from the same folder. Each such output is therefore exactly one of our
Hugging Face targets with the options kt's kernel is built for, plus a check that the experts
carry the names that loader looks for. Where the source already stores experts that way (Kimi-K2
INT4 group 32, DeepSeek FP8 128x128) they are carried bit-exact (recipes.gpu.carries_experts).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from moeport.detect.detection import Detection
from moeport.errors import MoeportError
from moeport.recipes import gpu, hf, kt_gptq, kt_mx
from moeport.recipes.base import Options, Target
from moeport.recipes.gptq import GPTQ_OPTIONS
from moeport.recipes.kt_cpu import check_cpu, host_flags
from moeport.sources.checkpoint import Checkpoint

# The expert names kt-kernel's loaders look for: (module holding experts, gate, up, down).
DEEPSEEK_NAMES = ("mlp", "gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = ("block_sparse_moe", "w1", "w3", "w2")
DSV4_NAMES = ("ffn", "w1", "w3", "w2")  # MXFP4's loader also tries the layer key without "model."
LAYER_PREFIXES = (
    "model.layers.{L}.",
    "model.language_model.layers.{L}.",
    "language_model.model.layers.{L}.",
    "layers.{L}.",
)


@dataclass(frozen=True)
class NativeMethod:
    target: str  # --to name
    method: str  # kt-kernel's method name (KTMoEWrapper(method=...))
    base: Target  # the Hugging Face target that writes this output
    fixed: dict[str, Any]  # the options kt's kernel requires (group size, dtype)
    names: tuple[tuple[str, str, str, str], ...]  # expert names its loader finds
    help: str
    # kt-kernel reads one scale per `group` input columns (it derives group_size = K / scale columns,
    # FP8 fixes it at 128, and its C++ requires K % group_size == 0): every expert K must divide
    group: int | None = None

    def build(self, ck: Checkpoint, det: Detection, opts: Options, metadata: dict[str, str]):
        self.check_names(det)
        self.check_alignment(det)
        plan, sink = self.base.build(ck, det, replace(opts, layout="hub", **self.fixed), metadata)
        how = f"{self.help}, calibrated GPTQ" if opts.method == "gptq" else self.help
        plan.title = f"{det.family.title}: {det.expert_format.name} -> kt-kernel {self.method} ({how})"
        plan.warnings += filter(None, [check_cpu(self.method, host_flags(), opts.kt_any_cpu)])
        return plan, sink

    def fits(self, det: Detection) -> bool:
        """Whether kt's loader finds experts under this model's names."""
        hub = det.family.hub
        have = (hub.block, hub.projs.get("gate"), hub.projs.get("up"), hub.projs.get("down"))
        return have in self.names and det.layer_prefix in LAYER_PREFIXES

    def check_names(self, det: Detection) -> None:
        if self.fits(det):
            return
        hub = det.family.hub
        have = (hub.block, hub.projs.get("gate"), hub.projs.get("up"), hub.projs.get("down"))
        wanted = " or ".join(
            f"'model.layers.{{L}}.{b}.experts.{{E}}.{g}/{u}/{d}'" for b, g, u, d in self.names
        )
        found = f"{det.layer_prefix}{hub.expert_base}{{E}}.{'/'.join(p or '?' for p in have[1:])}"
        raise MoeportError(
            f"--to {self.target}: kt-kernel's {self.method} loader reads experts named {wanted}; "
            f"{det.family.title} names them '{found}' (--to kt-int4 or kt-int8 write kt's own layout)"
        )

    def check_alignment(self, det: Detection) -> None:
        """One line before any work when some expert's K (hidden for gate/up, intermediate for down)
        is not a multiple of the group kt-kernel's kernel reads."""
        sizes = (("hidden size", det.hidden_size), ("expert intermediate size", det.expert_intermediate_size))
        for what, k in sizes:
            if self.group and k and k % self.group:
                raise MoeportError(
                    f"--to {self.target}: kt-kernel's {self.method} reads one scale per {self.group} input "
                    f"columns, and {det.family.title}'s {what} {k} is not a multiple of {self.group} "
                    "(--to kt-bf16 or kt-fp8-perchannel have no groups)"
                )

    def as_target(self) -> Target:
        passed = {"max_shard_bytes", "allow_nonfinite", "method", *GPTQ_OPTIONS}  # the base's to take
        takes = frozenset(passed & set(self.base.takes)) | {"kt_any_cpu"}
        calibrated = "method" in self.base.takes  # kt-gptq-int4: its base records the GPTQ options
        return Target(
            self.target,
            f"kt-kernel {self.method}: {self.help}, a Hugging Face folder its native loader reads",
            self.build,
            fields=lambda o: (
                {"method": self.method, **self.fixed}
                | ({"allow_nonfinite": True} if o.allow_nonfinite else {})
                | (self.base.fields(o) if calibrated else {})
            ),
            takes=takes,
            fits=self.fits,
        )


GPU = {t.name: t for t in gpu.TARGETS}
METHODS = (
    NativeMethod(
        "kt-rawint4", "RAWINT4", GPU["w4a16"], {"group_size": 32}, (DEEPSEEK_NAMES,), "INT4 group 32", 32
    ),
    NativeMethod(
        "kt-fp8",
        "FP8",
        GPU["fp8-block"],
        {},
        (DEEPSEEK_NAMES, MIXTRAL_NAMES),
        "FP8 E4M3, 128x128 blocks",
        128,
    ),
    NativeMethod(
        "kt-fp8-perchannel",
        "FP8_PERCHANNEL",
        GPU["fp8"],
        {},
        (DEEPSEEK_NAMES, MIXTRAL_NAMES),
        "FP8 E4M3 per row",
    ),
    NativeMethod("kt-bf16", "BF16", hf.TARGET, {"dtype": "bf16"}, (DEEPSEEK_NAMES, MIXTRAL_NAMES), "BF16"),
    NativeMethod(
        "kt-gptq-int4",
        "GPTQ_INT4",
        kt_gptq.TARGET,
        {"group_size": 128},
        (DEEPSEEK_NAMES, MIXTRAL_NAMES),
        "GPTQ INT4 symmetric, group 128",
        128,
    ),
    NativeMethod("kt-mxfp4", "MXFP4", kt_mx.MXFP4, {}, (DSV4_NAMES,), "MXFP4, E8M0 scale per 32", 32),
    NativeMethod("kt-mxfp8", "MXFP8", kt_mx.MXFP8, {}, (MIXTRAL_NAMES,), "MXFP8, E8M0 scale per 32", 32),
)
TARGETS = [m.as_target() for m in METHODS]
