"""kt-kernel's CPU needs per method, checked at convert time: a one-line refusal when this machine
could not run what it would write, and with --kt-any-cpu (converting on a build box for another
machine) a one-line WARNING and the output."""

from __future__ import annotations

import pytest
from test_convert_kt import kt_checkpoint, main  # noqa: F401 - fixtures

from moeport.recipes import TARGETS, kt, kt_native
from moeport.recipes.kt_cpu import AVX2, AVX512, NEEDS, cpu_warning, host_flags

# /proc/cpuinfo flags of an AVX2-only server CPU (AMD EPYC 7002, Zen 2): kt-kernel loads its avx2 variant
ZEN2 = set(
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
    "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid "
    "extd_apicid aperfmperf pni pclmulqdq monitor ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx "
    "f16c rdrand lahf_lm cmp_legacy svm extapic cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw ibs "
    "skinit wdt tce topoext perfctr_core perfctr_nb bpext perfctr_llc mwaitx cpb cat_l3 cdp_l3 hw_pstate "
    "ssbd mba ibrs ibpb stibp vmmcall fsgsbase bmi1 avx2 smep bmi2 cqm rdt_a rdseed adx smap clflushopt "
    "clwb sha_ni xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local clzero "
    "irperf xsaveerptr rdpru wbnoinvd arat npt lbrv svm_lock nrip_save tsc_scale vmcb_clean flushbyasid "
    "decodeassists pausefilter pfthreshold avic v_vmsave_vmload vgif umip rdpid overflow_recov succor "
    "smca".split()
)


def test_every_kt_method_states_its_cpu_needs() -> None:
    methods = {m.method for m in kt_native.METHODS} | {"AMXINT4", "AMXINT8"}
    assert methods == set(NEEDS)
    assert {t.name for t in kt.TARGETS} | {m.target for m in kt_native.METHODS} <= set(TARGETS)
    for method in ("AMXINT4", "AMXINT8", "FP8_PERCHANNEL"):  # AMX*_MOE only: AVX-512 variants and up
        assert NEEDS[method] == AVX512 and "avx512f" in cpu_warning(method, ZEN2)
    for method in set(NEEDS) - {"AMXINT4", "AMXINT8", "FP8_PERCHANNEL"}:  # AVX2*_MOE fallbacks
        assert NEEDS[method] == AVX2 and cpu_warning(method, ZEN2) is None
        assert "AVX2" in cpu_warning(method, ZEN2 - {"avx2"})
    assert cpu_warning("AMXINT4", ZEN2 | {"avx512f", "avx512bw"}) is None


@pytest.mark.parametrize("to", ["kt-fp8-perchannel", "kt-int4"])
def test_convert_refuses_or_warns_for_another_machine(main, kt_checkpoint, tmp_path, monkeypatch, to) -> None:  # noqa: F811
    for module in (kt, kt_native):  # the machine this runs on, as an AVX2-only host would report it
        monkeypatch.setattr(module, "host_flags", lambda: ZEN2)
    args = ("convert", str(kt_checkpoint("deepseek_v3")), str(tmp_path / "o"), "--to", to, "--quiet")
    code, _, err = main(*args)
    assert code == 2 and not (tmp_path / "o").exists()
    method = "FP8_PERCHANNEL" if to == "kt-fp8-perchannel" else "AMXINT4"
    assert err.count("error:") == 1 and err.endswith(  # (what precedes: the fixture's checkpoint writing)
        f"error: kt-kernel runs {method} only on CPUs with AVX-512 (avx512f, avx512bw) and this one lacks "
        "avx512f, avx512bw; to write it for another machine, add --kt-any-cpu"
    )
    code, _, err = main(*args, "--kt-any-cpu")
    assert code == 0 and (tmp_path / "o").is_dir()
    warning = err.split("WARNING: ")[1:]
    assert len(warning) == 1 and "lacks avx512f, avx512bw" in warning[0] and "another machine" in warning[0]


def test_this_host_reads_its_flags() -> None:
    flags = host_flags()
    assert flags is None or "fpu" in flags or "fp" in flags
