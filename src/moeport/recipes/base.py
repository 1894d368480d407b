"""What a target is: a name, a help line, and a recipe that turns a detected checkpoint into the
shared Plan plus the Sink that writes it. `Options` carries every user choice, grouped once."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from moeport.convert.execute import Sink
from moeport.convert.plan import Plan
from moeport.detect.detection import Detection
from moeport.errors import MoeportError
from moeport.recipes.provenance import source_fingerprint, source_name
from moeport.sinks.sharded import DEFAULT_MAX_SHARD_BYTES
from moeport.sources.checkpoint import Checkpoint


@dataclass(frozen=True)
class Options:
    """Every conversion choice (each target reads the ones it knows; `fields` names them)."""

    layout: str = "hub"  # hf: hub | fused
    dtype: str = "keep"  # hf: keep | bf16 | fp16 | fp32
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    group_size: int | None = 128  # w4a16/w8a16; None: per channel
    targets: str = "experts"  # GPU formats: experts | all-linear
    ignore: tuple[str, ...] = ()  # GPU formats: regexes kept unquantized
    numa: int = 1  # kt: NUMA slices T (threadpool_count)
    kt_layout: str = "merged"  # kt: merged | folders
    flavor: str = ""  # nvfp4/mxfp4: compressed-tensors | modelopt ("": the target's default)
    allow_nonfinite: bool = False  # quantize NaN/Inf weights instead of refusing them
    kt_any_cpu: bool = False  # kt: write a method this CPU could not run (for another machine)
    input_scales: str = ""  # nvfp4: calibration file of input absmax per module ("": weight-only)
    gguf_type: str = "bf16"  # gguf: the GGML type of the weights (recipes/gguf.py)
    device: str = "cpu"  # where the math runs; never changes the bytes
    source_label: str = ""  # how the source is named in the output's metadata (default: its folder's name)
    method: str = "rtn"  # w4a16/w8a16/kt-gptq-int4: rtn | gptq (calibrated, recipes/gptq.py)
    calibration: str = ""  # gptq: token ids (.json/.pt/.npy) or text (.txt/.jsonl) file
    samples: int = 512  # gptq: calibration samples
    seq_len: int = 2048  # gptq: tokens per sample
    dampening: float = 0.01  # gptq: fraction of mean(diag H) added to the diagonal
    act_order: bool = False  # gptq: quantize columns by decreasing activation
    all_experts: bool = False  # gptq: every calibration token reaches every expert's Hessian
    spill_states: bool | None = None  # gptq: states in a staging file (None: when over a budget)
    staging: str = ""  # where a run may keep resumable state (DST's staging folder; set by the CLI)


# The target-specific options, as the command line spells them. A target declares which it takes
# (`Target.takes`); one the user sets for a target that does not take it is refused, not ignored.
OPTION_FLAGS = {
    "layout": "--layout",
    "dtype": "--dtype",
    "group_size": "--group-size",
    "targets": "--targets",
    "ignore": "--ignore",
    "max_shard_bytes": "--max-shard-size",
    "numa": "--numa",
    "kt_layout": "--kt-layout",
    "flavor": "--flavor",
    "allow_nonfinite": "--allow-nonfinite",
    "kt_any_cpu": "--kt-any-cpu",
    "input_scales": "--input-scales",
    "gguf_type": "--gguf-type",
    "method": "--method",
    "calibration": "--calibration",
    "samples": "--samples",
    "seq_len": "--seq-len",
    "dampening": "--dampening",
    "act_order": "--act-order",
    "all_experts": "--all-experts",
    "spill_states": "--spill-states",
}

# (checkpoint, detection, options, metadata for the output files) -> the plan and its sink
Build = Callable[[Checkpoint, Detection, Options, dict[str, str]], tuple[Plan, Sink]]


@dataclass(frozen=True)
class Target:
    name: str
    help: str
    build: Build
    # the options that decide the output's bytes (recorded in the journal and the metadata)
    fields: Callable[[Options], dict[str, Any]] = field(default=lambda _o: {})
    # from the recorded recipe: whether every tensor must come out bit-exact (verify)
    lossless: Callable[[dict[str, Any]], bool] = field(default=lambda _r: False)
    # the Options fields (keys of OPTION_FLAGS) this target reads
    takes: frozenset[str] = frozenset()
    # whether it writes this model at all (kt loaders that read one family's names); the demo asks
    fits: Callable[[Detection], bool] = field(default=lambda _d: True)

    def refuse_unused(self, given: Iterable[str]) -> None:
        """Options the user set that this target would silently ignore are a mistake: say so."""
        unused = [OPTION_FLAGS[f] for f in OPTION_FLAGS if f in set(given) - self.takes]
        if unused:
            takes = ", ".join(OPTION_FLAGS[f] for f in OPTION_FLAGS if f in self.takes) or "none of them"
            what = "an option" if len(unused) == 1 else "options"
            raise MoeportError(f"{', '.join(unused)}: not {what} of --to {self.name} (it takes {takes})")


def job_recipe(target: Target, options: Options, ck: Checkpoint, det: Detection) -> dict[str, Any]:
    """Everything that identifies a conversion's output: a resumed run must match it exactly."""
    return {
        "to": target.name,
        **target.fields(options),
        "source": source_name(ck, options.source_label),
        "source_fingerprint": source_fingerprint(ck),
        "source_family": det.family.name,
        "source_files": [[f.name, f.stat().st_size] for f in sorted(ck.files)],
    }
