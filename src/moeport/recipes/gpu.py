"""Recipes `--to w4a16|w8a16|fp8|fp8-block`: quantized checkpoints that GPU servers load.

w4a16/w8a16: compressed-tensors `pack-quantized` (RTN, symmetric, per group or per channel), fp8:
compressed-tensors `float-quantized` (E4M3, per-channel scale, dynamic per-token activations), fp8-block:
DeepSeek-style E4M3 + `weight_scale_inv` per 128×128 block with `quant_method: fp8`. Built on the
hf recipe (hub names): each targeted weight is decoded from whatever the source stores, in float32,
and encoded; untargeted tensors keep their storage (quantized ones are dequantized to bf16, since
one checkpoint holds one quantization scheme).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch

from moeport.codecs import Fp8BlockCodec, PackQuantizedCodec, float_quantized_codec
from moeport.codecs.base import Codec
from moeport.convert.dequantize import Cast
from moeport.convert.encode import Encode, EncodeShared, Recode, part_specs, recode_specs
from moeport.convert.plan import HF_QUANT_CONFIG, Plan, Unit, finalize
from moeport.detect.detection import Detection
from moeport.dtypes import torch_dtype_of
from moeport.errors import MoeportError
from moeport.mappings.ops import Chain, Op
from moeport.recipes.base import Options, Target
from moeport.recipes.fused import fused_sets, same_kind_source
from moeport.recipes.hf import build_hf, linear_prefix_pattern
from moeport.sinks.sharded import HfSink
from moeport.sources.checkpoint import Checkpoint
from moeport.zoo.model_config import rewrite_storage_fields

SCHEMES = ("w4a16", "w8a16", "fp8", "fp8-block")
INT_SCHEMES = ("w4a16", "w8a16")  # the grouped ones: --group-size
# Never quantized whatever --targets says: embeddings, norms, routers, the LM head, vision towers.
ALWAYS_IGNORED = (
    r"embed",
    r"norm",
    r"lm_head",
    r"(^|\.)head\.",
    r"\.mlp\.gate\.",
    r"\.gate\.weight$",
    r"router",
    r"shared_expert_gate",
    r"visual|vision",
    r"\.indexer\.",
)


@dataclass(frozen=True)
class Recipe:
    scheme: str
    group_size: int | None = 128  # None: per channel (w4a16/w8a16 only)
    targets: str = "experts"  # "experts" | "all-linear"
    ignore: tuple[str, ...] = ()  # module names or regexes (`re:` prefix optional), see ignore_regex
    allow_nonfinite: bool = False  # quantize NaN/Inf weights instead of refusing them

    def codec(self) -> Codec:
        if self.scheme in ("w4a16", "w8a16"):
            bits = 4 if self.scheme == "w4a16" else 8
            return PackQuantizedCodec(bits=bits, group_size=self.group_size, symmetric=True)
        if self.scheme == "fp8":
            return float_quantized_codec("channel")
        if self.scheme == "fp8-block":
            return Fp8BlockCodec(block=(128, 128))
        raise MoeportError(f"--to {self.scheme}: unknown scheme; expected one of {', '.join(SCHEMES)}")

    def carried(self, ck: Checkpoint, det: Detection) -> str | None:
        return carries_experts(ck, det, self)

    def quantization_config(self, kept_linear: list[str]) -> dict[str, Any]:
        return quantization_config(self, kept_linear)


def carries_experts(ck: Checkpoint, det: Detection, recipe: Recipe) -> str | None:
    """The part under which the source's experts are already stored exactly as this recipe would
    write them, or None. Such experts are carried bit-exact instead of dequantized and requantized:
    Kimi-K2's native INT4 (pack-quantized, symmetric, group 32, BF16 scales) into w4a16 group 32,
    DeepSeek/Kimi/GLM FP8 (128x128 blocks, F32 weight_scale_inv) into fp8-block. Not with --ignore,
    which may ask for some experts in 16 bits."""
    codec, fmt = recipe.codec(), det.expert_format
    if fmt.name != codec.name or recipe.ignore:
        return None
    p = fmt.params
    if isinstance(codec, PackQuantizedCodec):
        same = (
            int(p.get("num_bits", 0)) == codec.bits
            and p.get("group_size") == codec.group_size
            and bool(p.get("symmetric")) == codec.symmetric
            and p.get("strategy") == ("group" if codec.group_size else "channel")
        )
        layers = det.naming.expert_layers(ck.keys(), det.layout)
        groups = next(iter(layers.values())).parts.values() if layers else []
        scales = [g["weight_scale"] for g in groups if "weight_scale" in g]  # hub or fused names
        same = same and bool(scales) and ck.info(scales[0]).dtype == "BF16"  # what the codec writes
        return "weight_packed" if same else None
    if isinstance(codec, Fp8BlockCodec):
        same = (
            tuple(p.get("block", ())) == codec.block
            and p.get("scale") == codec.scale_name
            and p.get("scale_dtype") == "F32"
            and not p.get("ue8m0")
        )
        return "weight" if same else None
    return None


def plan_gpu(ck: Checkpoint, det: Detection, recipe: Any, device: str = "cpu") -> Plan:
    """The GPU-server plan of any recipe with `scheme`, `targets`, `ignore`, `allow_nonfinite`,
    `codec()`, `carried(ck, det)` and `quantization_config(kept_linear)` (this module's, fp4's)."""
    codec = recipe.codec()
    carried = recipe.carried(ck, det)
    moved_from = None if carried else same_kind_source(codec, det, recipe.ignore)
    base, decoded = build_hf(
        ck,
        det,
        "linear",
        torch.float32,
        cast_floats=False,
        device=device,
        keep_experts=bool(carried or moved_from),
    )
    base = finalize(base, ck)  # specs of the float plan tell which outputs are 2-D weights
    spec_of = {s.name: s for s in base.specs}
    expert_re = expert_regex(det)
    expert_part_re = expert_regex(det, part=r"\w+")
    always = [re.compile(p) for p in ALWAYS_IGNORED]
    user = [(p, ignore_regex(p)) for p in recipe.ignore]
    matched = dict.fromkeys(recipe.ignore, 0)  # modules each --ignore pattern matched
    spared = dict.fromkeys(recipe.ignore, 0)  # ... of which would otherwise be quantized
    part_cache: dict[tuple[int, ...], tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]] = {}
    quantized: list[str] = []
    misfit: list[tuple[str, int]] = []  # targeted weights whose K the group size does not divide
    kept_linear: list[str] = []

    def is_target(name: str) -> bool:
        if not name.endswith(".weight") or len(spec_of[name].shape) != 2:
            return False
        eligible = not any(r.search(name) for r in always) and (
            recipe.targets == "all-linear" or bool(expert_re.match(name))
        )
        module = name.removesuffix(".weight")
        hits = [p for p, r in user if r.search(module) or r.search(name)]
        for p in hits:
            matched[p] += 1
            spared[p] += eligible
        return eligible and not hits

    def specs(name: str):
        shape = spec_of[name].shape
        if shape not in part_cache:
            part_cache[shape] = part_specs(codec, shape, name)
        return part_cache[shape]

    ops: list[list[Op]] = [[unit.op] for unit in base.units]  # per unit: its op, then the extra ones
    targets: dict[str, int] = {}  # targeted weight -> its unit
    moved: dict[str, dict[str, tuple[str, int]]] = {}  # weight prefix -> part -> (name, unit)
    for i, unit in enumerate(base.units):
        for name in unit.op.outputs:
            if carried and expert_part_re.match(name):  # carried as stored, bit-exact
                if name.endswith(f".{carried}"):
                    quantized.append(name)
            elif moved_from is not None and expert_part_re.match(name) and not name.endswith(".bias"):
                # same codes, other format (a bias, GPT-OSS's, is copied as it is)
                prefix, _, part = name.rpartition(".")
                if f"_{part}" in moved_from.required:  # per-expert names drop the '_' of `_blocks`
                    part = f"_{part}"
                moved.setdefault(f"{prefix}.", {})[part] = (name, i)
            elif is_target(name):
                shape = spec_of[name].shape
                quantized.append(name)
                grouped = recipe.scheme in INT_SCHEMES  # --group-size, or an FP4 format's (fp4.Recipe)
                group = getattr(recipe, "format_group", None) or (recipe.group_size if grouped else None)
                if group and shape[-1] % group:
                    misfit.append((name, shape[-1]))
                    continue
                targets[name] = i
            else:
                if name in decoded:
                    ops[i].append(Cast(name, name, torch.bfloat16))
                if name.endswith(".weight") and len(spec_of[name].shape) == 2:
                    kept_linear.append(name.removesuffix(".weight"))
    if misfit:
        _refuse_group_size(recipe, misfit, [spec_of[n].shape[-1] for n in quantized], len(quantized))
    shared = getattr(codec, "shares_global_scale", False)
    home = list(range(len(ops)))  # a unit merged into another one lives there

    def merged(indices: set[int]) -> int:
        """One unit doing the work of `indices` (the tensors of one op are applied together)."""
        homes = sorted({_home(home, i) for i in indices})
        for other in homes[1:]:
            ops[homes[0]] += ops[other]
            ops[other] = []
            home[other] = homes[0]
        return homes[0]

    for group in fused_sets(list(targets), det) if shared else [(n,) for n in targets]:
        unit_of_group = merged({targets[n] for n in group})
        bases = tuple(n.removesuffix("weight") for n in group)
        if len(group) == 1:
            op: Op = Encode(group[0], bases[0], codec, specs(group[0]), device, recipe.allow_nonfinite)
        else:
            op = EncodeShared(
                group, bases, codec, tuple(specs(n) for n in group), device, recipe.allow_nonfinite
            )
        ops[unit_of_group].append(op)
    dropped = 0
    for prefix, parts in moved.items():
        required = moved_from.required  # type: ignore[union-attr]
        missing = [p for p in required if p not in parts]
        if missing:
            raise MoeportError(f"{prefix}{missing[0]}: missing (the weight is stored as {moved_from.name})")
        # every part is read (the ones the target has no place for, activation scales, are dropped)
        sources = tuple((p, name) for p, (name, _) in parts.items())
        shapes = {
            p: (spec_of[n].shape, torch_dtype_of(spec_of[n].dtype)) for p, n in sources if p in required
        }
        specs_out = recode_specs(moved_from, codec, shapes)
        unit = merged({i for _, i in parts.values()})
        ops[unit].append(Recode(sources, prefix, moved_from, codec, specs_out))
        dropped += len(parts) - len(required)
    units: list[Unit] = [
        Unit(unit.layer, chain[0] if len(chain) == 1 else Chain(tuple(chain)))
        for unit, chain in zip(base.units, ops, strict=False)
        if chain
    ]
    for p, n in matched.items():
        if n == 0:
            example = quantized[0].removesuffix(".weight") if quantized else next(iter(kept_linear), "")
            raise MoeportError(f"--ignore {p!r}: matches no linear module (names look like {example})")
    n_moved = len(moved)
    if not quantized and not n_moved:
        why = f"; {det.family.title}: {det.family.not_linear}" if det.family.not_linear else ""
        raise MoeportError(f"{ck.root}: no weight matches --targets {recipe.targets} (after --ignore){why}")
    plan = Plan(units, _config(ck.config, recipe.quantization_config(kept_linear)))
    plan.side_files[HF_QUANT_CONFIG] = None  # the new quantization_config says it all (fp4 writes its own)
    if plan.config is not None:
        rewrite_storage_fields(plan.config, det.family.storage_fields, codec.name)
    how = "carried bit-exact (the source stores them in this scheme)" if carried else "quantized"
    if moved_from is not None:
        plan.notes.append(
            f"{recipe.scheme}: {n_moved} expert weights moved {moved_from.name} -> {codec.name} without "
            "requantizing (same codes and block scales; a global scale converted by its reciprocal)"
            + (f"; {dropped} activation scale(s) dropped (weight-only output)" if dropped else "")
        )
    plan.notes.append(f"{recipe.scheme}: {len(quantized)} weights {how}, {len(kept_linear)} linear kept")
    for p, n in matched.items():
        modules = "1 module" if n == 1 else f"{n} modules"
        plan.notes.append(f"--ignore {p!r}: {modules} matched, {spared[p]} of them spared quantization")
    return finalize(plan, ck)


def _refuse_group_size(recipe: Recipe, misfit: list[tuple[str, int]], ks: list[int], total: int) -> None:
    """One line naming the first weight whose K the group size does not divide, and the largest
    group size that divides every targeted K (or per channel); an FP4 format's group is fixed."""
    (name, k), fixed = misfit[0], getattr(recipe, "format_group", None)
    size = fixed or recipe.group_size or 0
    fits = [g for g in (128, 64, 32, 16, 8) if g < size and all(x % g == 0 for x in ks)] if not fixed else []
    hint = f"use --group-size {fits[0]}, which fits every targeted weight, or " if fits else ""
    hint = "use --group-size 0 (per channel) or " if not fits and not fixed else hint
    head, of = f"--group-size {size}", "it"
    if fixed:
        head, of = f"--to {recipe.scheme}", f"the {size} a scale covers"
    raise MoeportError(
        f"{head}: {name} has {k} input columns, not a multiple of {of} ({len(misfit)} of {total} targeted "
        f"weights); {hint}leave those modules out with --ignore"
    )


def _home(home: list[int], i: int) -> int:
    while home[i] != i:
        i = home[i]
    return i


def ignore_regex(pattern: str) -> re.Pattern[str]:
    """An --ignore pattern as users bring it: a module name (`model.layers.0.self_attn.q_a_proj`),
    a regex, or llmcompressor's `re:<regex>`; searched in module and weight names."""
    try:
        return re.compile(pattern.removeprefix("re:"))
    except re.error as exc:
        raise MoeportError(f"--ignore {pattern!r}: not a regular expression ({exc})") from None


def expert_regex(det: Detection, part: str = "weight") -> re.Pattern[str]:
    """Routed-expert tensors under hub names, `part` being a regex of the last name segment."""
    layout = det.family.per_expert
    prefix = linear_prefix_pattern(det)
    projs = "|".join(re.escape(p) for p in layout.projs.values())
    proj = "" if layout.one_linear else rf"(?:{projs})\."  # VitPose+: `experts.3.weight`, one linear
    return re.compile(rf"^{prefix}{re.escape(layout.expert_base)}\d+\.{proj}{part}$")


def _config(config: dict[str, Any] | None, quant: dict[str, Any]) -> dict[str, Any] | None:
    if config is None:
        return None
    cfg = copy.deepcopy(config)
    for c in (cfg, cfg.get("text_config")):
        if isinstance(c, dict):
            c.pop("quantization_config", None)
    cfg["quantization_config"] = quant
    return cfg


def quantization_config(recipe: Recipe, kept_linear: list[str]) -> dict[str, Any]:
    """config.json `quantization_config`, as compressed-tensors (or DeepSeek FP8) reads it."""
    if recipe.scheme == "fp8-block":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "modules_to_not_convert": sorted(kept_linear) + ["lm_head"],
        }
    if recipe.scheme == "fp8":
        weights = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}
        activations = {
            "num_bits": 8,
            "type": "float",
            "strategy": "token",
            "symmetric": True,
            "dynamic": True,
        }
        fmt = "float-quantized"
    else:
        bits = 4 if recipe.scheme == "w4a16" else 8
        grouped = recipe.group_size is not None
        weights = {
            "num_bits": bits,
            "type": "int",
            "symmetric": True,
            "strategy": "group" if grouped else "channel",
            "group_size": recipe.group_size,
        }
        activations = None
        fmt = "pack-quantized"
    weights.update({"dynamic": False, "actorder": None, "observer": "minmax"})
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": activations,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": sorted(kept_linear) + ["lm_head"],
        "kv_cache_scheme": None,
    }


def recipe_of(scheme: str, opts: Options) -> Recipe:
    """The user's options as a GPU recipe, each checked (one line per mistake)."""
    if opts.layout != "hub":
        raise MoeportError(
            f"--to {scheme} writes per-expert (hub) names, as vLLM/SGLang load them; drop --layout"
        )
    if opts.targets not in ("experts", "all-linear"):
        raise MoeportError(f"--targets {opts.targets}: expected experts or all-linear")
    if opts.group_size is not None and opts.group_size <= 0:
        raise MoeportError(f"--group-size {opts.group_size}: expected a positive size, or 0 for per channel")
    for pattern in opts.ignore:
        ignore_regex(pattern)
    return Recipe(scheme, opts.group_size, opts.targets, tuple(opts.ignore), opts.allow_nonfinite)


def _target(scheme: str, help: str) -> Target:
    def build(ck: Checkpoint, det: Detection, opts: Options, metadata: dict[str, str]):
        recipe = recipe_of(scheme, opts)
        plan = plan_gpu(ck, det, recipe, opts.device)
        plan.title = f"{det.family.title}: {det.expert_format.name} -> {scheme} ({opts.targets})"
        return plan, HfSink(opts.max_shard_bytes, metadata)

    def fields(opts: Options) -> dict[str, object]:
        fields = {"group_size": opts.group_size, "targets": opts.targets, "ignore": list(opts.ignore)}
        return fields | ({"allow_nonfinite": True} if opts.allow_nonfinite else {})

    takes = {"targets", "ignore", "max_shard_bytes", "allow_nonfinite"}
    takes |= {"group_size"} if scheme in INT_SCHEMES else set()
    return Target(scheme, help, build, fields, takes=frozenset(takes))


TARGETS = [
    _target(
        "w4a16", "compressed-tensors INT4 weights, 16-bit activations (--group-size, --targets, --ignore)"
    ),
    _target(
        "w8a16", "compressed-tensors INT8 weights, 16-bit activations (--group-size, --targets, --ignore)"
    ),
    _target("fp8", "compressed-tensors FP8 per-channel weights, dynamic per-token activations"),
    _target("fp8-block", "DeepSeek-style FP8 with 128x128 weight_scale_inv blocks"),
]
