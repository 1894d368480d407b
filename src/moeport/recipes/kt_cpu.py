"""The CPU instructions kt-kernel needs to RUN each of its methods, checked when its files are written.

Read from kt-kernel 0.7.2 (python/utils/amx.py's backend choice per method, and the classes each of
its wheel's six CPU variants compiles: `_kt_kernel_ext_{amx,avx512_bf16,avx512_vbmi,avx512_vnni,
avx512_base,avx2}`, picked by `_cpu_detect.detect_cpu_features` from /proc/cpuinfo):

- AMXINT4, AMXINT8, FP8_PERCHANNEL: only the `AMX*_MOE` classes, compiled in the AVX-512 variants
  and up (on AVX-512 without AMX tiles they run AVX-512 code): AVX-512 F + BW at least, AMX for speed;
- RAWINT4, FP8, BF16, GPTQ_INT4, MXFP4, MXFP8: also `AVX2*_MOE` fallbacks, compiled in every variant
  (AVX-VNNI picks a faster INT4 path): AVX2 at least.

A missing feature refuses the conversion in one line before any work (kt-kernel could not run the
output on this machine); converting on a build machine for another one is legitimate, so
`--kt-any-cpu` turns the refusal into a one-line WARNING (the output is the same).
"""

from __future__ import annotations

from pathlib import Path

from moeport.errors import MoeportError

AVX512 = ("avx512f", "avx512bw")
AVX2 = ("avx2",)
NEEDS = {
    "AMXINT4": AVX512,
    "AMXINT8": AVX512,
    "FP8_PERCHANNEL": AVX512,
    "RAWINT4": AVX2,
    "FP8": AVX2,
    "BF16": AVX2,
    "GPTQ_INT4": AVX2,
    "MXFP4": AVX2,
    "MXFP8": AVX2,
}
_NAMES = {AVX512: "AVX-512 (avx512f, avx512bw)", AVX2: "AVX2"}


def host_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU flags this machine reports, as kt-kernel reads them; None where they cannot be read."""
    try:
        for line in cpuinfo.read_text().lower().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def missing(method: str, flags: set[str]) -> list[str]:
    """The flags kt-kernel needs for `method` that `flags` lacks (as kt reads them: with or without '_')."""
    return [f for f in NEEDS.get(method, ()) if f not in flags and f.replace("_", "") not in flags]


def cpu_warning(method: str, flags: set[str] | None) -> str | None:
    """One line saying that this machine cannot run `method` in kt-kernel, or None."""
    if flags is None or method not in NEEDS:
        return None
    lacking = missing(method, flags)
    if not lacking:
        return None
    return (
        f"WARNING: kt-kernel runs {method} only on CPUs with {_NAMES[NEEDS[method]]}; this one lacks "
        f"{', '.join(lacking)}: the output is right, but for another machine (kt-kernel refuses it here)"
    )


def check_cpu(method: str, flags: set[str] | None, any_cpu: bool) -> str | None:
    """Refuse (one line) writing `method` on a CPU that kt-kernel could not run it on, unless the
    user converts for another machine (`any_cpu`: then the warning line, for the plan's notes)."""
    warning = cpu_warning(method, flags)
    if warning is None or any_cpu:
        return warning
    lacking = ", ".join(missing(method, flags or set()))
    raise MoeportError(
        f"kt-kernel runs {method} only on CPUs with {_NAMES[NEEDS[method]]} and this one lacks {lacking}; "
        "to write it for another machine, add --kt-any-cpu"
    )
