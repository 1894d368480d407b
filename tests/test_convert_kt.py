"""`moeport convert --to kt-int4|kt-int8`: kt-kernel loads and runs our output; bytes, resume, errors.

Fixtures are real transformers checkpoints (tiny_config's families) made large enough for kt's AMX
alignment: hidden 256, expert intermediate 256, 4 experts, 2 MoE layers.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import COMMON, FAMILY_CONFIGS
from kt_support import import_kt, kt_wrapper, tp_slices
from safetensors import safe_open

from moeport.codecs import kt_amx as K
from moeport.convert.destination import JOURNAL_NAME, staging_of
from moeport.sinks import kt_layout as L
from moeport.sinks.kt import MANIFEST_NAME
from moeport.sinks.sharded import INDEX_NAME

H = 256
I_SIZE = 256
E = 4
TOPK = 2
# family -> (config overrides, layout, per-expert names (gate, up, down) or None for fused, block)
FAMILIES = {
    "deepseek_v3": (dict(moe_intermediate_size=I_SIZE), "hub", ("gate_proj", "up_proj", "down_proj"), "mlp"),
    "qwen3_moe": (dict(moe_intermediate_size=I_SIZE, num_hidden_layers=2), "fused", None, "mlp"),
    "minimax_m2": (
        dict(intermediate_size=I_SIZE, num_hidden_layers=2),
        "hub",
        ("w1", "w3", "w2"),
        "block_sparse_moe",
    ),
    "glm_moe_dsa": (dict(moe_intermediate_size=I_SIZE), "hub", ("gate_proj", "up_proj", "down_proj"), "mlp"),
    "deepseek_v4": (
        dict(moe_intermediate_size=I_SIZE, num_hidden_layers=2),
        "hub",
        ("w1", "w3", "w2"),
        "ffn",
    ),
}


def _build(model_type: str, out: Path, fp8_block: list[int] | None = None) -> Path:
    """A transformers checkpoint of `model_type` with kt-sized experts (optionally FP8-block)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    over, layout, _, _ = FAMILIES[model_type]
    cfg = AutoConfig.for_model(
        model_type, **{**COMMON, **FAMILY_CONFIGS[model_type], "hidden_size": H, **over}
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)
    src = out if fp8_block is None else out.with_name(out.name + "-bf16")
    model.save_pretrained(src, save_original_format=(layout == "hub"))
    if fp8_block is None:
        return out
    from fixtures import quantize_fp8_block

    return quantize_fp8_block(src, out, block=list(fp8_block))


@pytest.fixture(scope="module")
def kt_checkpoint(tmp_path_factory):
    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("kt-checkpoints")

    def make(model_type: str, fp8_block: tuple[int, int] | None = None) -> Path:
        key = (model_type, fp8_block)
        if key not in cache:
            name = model_type + ("" if fp8_block is None else f"-fp8-{fp8_block[0]}x{fp8_block[1]}")
            cache[key] = _build(model_type, root / name, list(fp8_block) if fp8_block else None)
        return cache[key]

    return make


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (for signals and resource limits)."""
    return subprocess.run(
        [sys.executable, "-m", "moeport", *args], capture_output=True, text=True, timeout=300, **kw
    )


@pytest.fixture
def main(main):
    """conftest's in-process CLI, with stdout and stderr on one line each (whitespace collapsed)."""

    def run(*args: str) -> tuple[int, str, str]:
        code, out, err = main(*args)
        return code, " ".join(out.split()), " ".join(err.split())

    return run


def convert(main, src: Path, dst: Path, *extra: str) -> str:
    code, out, err = main("convert", str(src), str(dst), *extra)
    assert code == 0, err
    return out


def _source_experts(src: Path, model_type: str, layer: int) -> list[tuple[torch.Tensor, ...]]:
    """bf16 gate [I, H], up [I, H], down [H, I] per expert, read straight from the files (no moeport)."""
    _, _, names, block = FAMILIES[model_type]
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        base = f"model.layers.{layer}.{block}.experts"
        if names is None:  # transformers v5 fused: gate_up [E, 2I, H], gate rows first
            gu, down = f.get_tensor(f"{base}.gate_up_proj"), f.get_tensor(f"{base}.down_proj")
            assert gu.shape == (E, 2 * I_SIZE, H) and down.shape == (E, H, I_SIZE)
            return [(gu[e, :I_SIZE], gu[e, I_SIZE:], down[e]) for e in range(E)]
        return [tuple(f.get_tensor(f"{base}.{e}.{n}.weight") for n in names) for e in range(E)]


def _requantized(gate, up, down, bits: int, tp: int) -> tuple[torch.Tensor, ...]:
    """The weights kt should hold: each TP slice quantized and dequantized (the spec's rules)."""
    g, u, d = [], [], []
    for slices in tp_slices(gate, up, down, tp):
        deq = [K.kt_dequantize(*K.kt_quantize(m, bits), *m.shape, bits) for m in slices]
        g.append(deq[0])
        u.append(deq[1])
        d.append(deq[2])
    return torch.cat(g), torch.cat(u), torch.cat(d, dim=1)


def _torch_moe(x, ids, weights, experts) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float32)
    xf = x.float()
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            gate, up, down = experts[int(ids[t, j])]
            h = torch.nn.functional.silu(gate @ xf[t]) * (up @ xf[t])
            out[t] += weights[t, j] * (down @ h)
    return out


def _kt_forward(monkeypatch, path: Path, layer: int, method: str, tp: int, x, ids, weights) -> torch.Tensor:
    _, experts_base = import_kt()
    from kt_kernel.utils.amx import AMXMoEWrapper

    monkeypatch.setenv("KT_FORCE_SYNC_SUBMIT", "1")
    monkeypatch.setattr(AMXMoEWrapper, "_safetensor_loader_instance", None)
    monkeypatch.setattr(experts_base.KExpertsCPUBuffer, "temp_bs", 0)
    wrapper = kt_wrapper(monkeypatch, path, layer, E, TOPK, H, I_SIZE, method, tp, cpu_save=False)
    wrapper.load_weights(torch.arange(E, dtype=torch.int64))
    out = wrapper.forward(x, ids, weights, 0).float().clone()
    del wrapper
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


FORWARD_CASES = [  # model_type, --to, T, kt layout
    ("deepseek_v3", "kt-int4", 2, "merged"),
    ("qwen3_moe", "kt-int8", 2, "merged"),
    ("minimax_m2", "kt-int4", 1, "folders"),
    ("glm_moe_dsa", "kt-int8", 1, "merged"),
    ("qwen3_moe", "kt-int4", 2, "folders"),
]


@pytest.mark.parametrize("model_type,to,tp,kt_layout", FORWARD_CASES)
def test_kt_kernel_forward_matches_torch(
    monkeypatch, main, kt_checkpoint, tmp_path, model_type, to, tp, kt_layout
):
    import_kt()
    src = kt_checkpoint(model_type)
    dst = tmp_path / "kt"
    convert(main, src, dst, "--to", to, "--numa", str(tp), "--kt-layout", kt_layout)
    bits = 4 if to == "kt-int4" else 8
    method = K.method_name(bits)
    if kt_layout == "merged":
        assert (dst / INDEX_NAME).exists() and not list(dst.glob("_layer_*"))
    else:
        assert (dst / MANIFEST_NAME).exists() and not list(dst.glob("*.safetensors"))
    layers = json.loads((src / "config.json").read_text())
    first = layers.get("first_k_dense_replace", 0)
    moe_layers = list(range(first, layers["num_hidden_layers"]))
    assert len(moe_layers) == 2
    g = torch.Generator().manual_seed(1)
    for layer in moe_layers:
        x = torch.randn(8, H, generator=g).bfloat16()
        ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(8)])
        weights = torch.rand(8, TOPK, generator=g)
        got = _kt_forward(monkeypatch, dst, layer, method, tp, x, ids, weights)
        experts = [_requantized(*m, bits, tp) for m in _source_experts(src, model_type, layer)]
        want = _torch_moe(x, ids, weights, experts)
        err = _rel(got, want)
        assert err < 0.05, f"layer {layer}: relative L2 error {err:.3f}"


def _read_merged(dst: Path, key: str) -> torch.Tensor:
    index = json.loads((dst / INDEX_NAME).read_text())
    with safe_open(str(dst / index["weight_map"][key]), "pt") as f:
        return f.get_tensor(key)


@pytest.mark.parametrize("to", ["kt-int4", "kt-int8"])
def test_bytes_equal_kt_quantize_of_source(main, kt_checkpoint, tmp_path, to):
    src = kt_checkpoint("deepseek_v3")
    dst = tmp_path / "kt"
    convert(main, src, dst, "--to", to, "--numa", "2")
    bits = 4 if to == "kt-int4" else 8
    layer, e = 2, 3
    gate, up, down = _source_experts(src, "deepseek_v3", layer)[e]
    for t, mats in enumerate(tp_slices(gate, up, down, 2)):
        for proj, m in zip(L.PROJS, mats, strict=True):
            q, s = K.kt_quantize(m, bits)
            assert torch.equal(_read_merged(dst, L.merged_key(layer, proj, e, t, "weight")), q)
            assert torch.equal(_read_merged(dst, L.merged_key(layer, proj, e, t, "scale")), s)
    index = json.loads((dst / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    total = 0
    for name in shards:
        with safe_open(str(dst / name), "pt") as f:
            meta = f.metadata()
            total += sum(_nbytes(f, k) for k in f.keys())
        assert meta["kt_method"] == K.method_name(bits) and meta["kt_threadpool_count"] == "2"
        assert meta["kt_layout_version"] == "1" and meta["source_family"] == "deepseek_v3"
        assert meta["source"] == src.name and str(src.parent) not in "".join(meta.values())
    assert index["metadata"]["total_size"] == total
    with safe_open(str(src / "model.safetensors"), "pt") as f:  # non-expert tensors copied unchanged
        key = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
        assert torch.equal(f.get_tensor(key), _read_merged(dst, key))
    for side in ("config.json", "generation_config.json"):
        assert (dst / side).read_bytes() == (src / side).read_bytes()


def _nbytes(f, key: str) -> int:
    t = f.get_tensor(key)
    return t.numel() * t.element_size()


@pytest.mark.parametrize(
    "model_type,block,fused",
    [
        ("deepseek_v3", (128, 64), 3),  # every NUMA slice on block boundaries: all through the fused kernel
        ("qwen3_moe", (128, 128), 3),  # fused [E, 2I, H] stacks too
        ("deepseek_v3", (256, 128), 1),  # gate/up slices cut a block of rows: decoded first; down fused
    ],
)
def test_fp8_block_source_bytes(main, kt_checkpoint, tmp_path, monkeypatch, model_type, block, fused):
    """FP8-block experts (any block size; per-expert or fused [E, 2I, H]) decoded, rounded to bf16,
    quantized: equal to kt_quantize of the independently decoded source. A slice whose rows or
    columns lie on scale-block boundaries is encoded from its own FP8 parts by the fused kernel
    (counted here), the rest from the bf16 decode: the same bytes either way."""
    from moeport.codecs import kt_kernels
    from moeport.codecs.fp8 import Fp8BlockCodec

    calls = []
    kernel = kt_kernels._fp8_block_to_kt
    monkeypatch.setattr(kt_kernels, "_fp8_block_to_kt", lambda *a: calls.append(a[0].shape) or kernel(*a))
    src = kt_checkpoint(model_type, block)
    dst = tmp_path / "kt"
    convert(main, src, dst, "--to", "kt-int4", "--numa", "2", "--quiet")
    weight_map = json.loads((dst / INDEX_NAME).read_text())["weight_map"]
    slices = len([k for k in weight_map if "_exps." in k and k.endswith(".weight")])
    assert len(calls) == slices * fused // 3 and slices > 0
    layer, e = 1, 2
    codec = Fp8BlockCodec(block=block, scale_name="weight_scale_inv")
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        base = f"model.layers.{layer}.mlp.experts"
        if model_type == "qwen3_moe":
            gu, down = (
                codec.decode(
                    {
                        "weight": f.get_tensor(f"{base}.{n}")[e],
                        "weight_scale_inv": f.get_tensor(f"{base}.{n}_scale_inv")[e],
                    }
                )
                for n in ("gate_up_proj", "down_proj")
            )
            mats = [gu[:I_SIZE].bfloat16(), gu[I_SIZE:].bfloat16(), down.bfloat16()]
        else:
            mats = [
                codec.decode(
                    {p: f.get_tensor(f"{base}.{e}.{n}.{p}") for p in ("weight", "weight_scale_inv")}
                ).bfloat16()
                for n in ("gate_proj", "up_proj", "down_proj")
            ]
    for t, slices in enumerate(tp_slices(*mats, 2)):
        for proj, m in zip(L.PROJS, slices, strict=True):
            q, s = K.kt_quantize(m, 4)
            assert torch.equal(_read_merged(dst, L.merged_key(layer, proj, e, t, "weight")), q)
            assert torch.equal(_read_merged(dst, L.merged_key(layer, proj, e, t, "scale")), s)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_disk_full_fails_cleanly(main, kt_checkpoint, tmp_path):
    src = kt_checkpoint("deepseek_v3")
    dst = tmp_path / "kt"
    limit = 300_000  # bytes per file: a layer shard (~0.9 MB for INT4 T=1) cannot be written

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = cli("convert", str(src), str(dst), "--quiet", "--to", "kt-int4", preexec_fn=small_files)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0] and "error:" in lines[0], result.stderr
    assert not dst.exists()  # DST appears only when complete; the staging folder keeps what is done
    assert not json.loads((staging_of(dst) / JOURNAL_NAME).read_text())["complete"]
    assert not list(staging_of(dst).glob("*.partial"))
    # with room again, the same command finishes the job
    convert(main, src, dst, "--to", "kt-int4", "--quiet")
    assert (dst / INDEX_NAME).exists()


def test_recipe_mismatch_refused_and_complete_is_noop(main, kt_checkpoint, tmp_path):
    src = kt_checkpoint("minimax_m2")
    dst = tmp_path / "kt"
    convert(main, src, dst, "--to", "kt-int4", "--quiet")
    before = _tree(dst)
    assert "already complete" in convert(main, src, dst, "--to", "kt-int4")
    for extra in (("--to", "kt-int8"), ("--numa", "2"), ("--kt-layout", "folders")):
        extra = ("--to", "kt-int4", *extra) if extra[0] != "--to" else extra
        code, _, err = main("convert", str(src), str(dst), *extra)
        assert code == 2 and "different recipe" in err, err
    assert _tree(dst) == before
    convert(main, src, dst, "--quiet", "--to", "kt-int8", "--overwrite")
    assert json.loads((dst / JOURNAL_NAME).read_text())["recipe"]["method"] == "AMXINT8"


def test_misaligned_shape_suggests_tp(main, kt_checkpoint, tmp_path):
    src = kt_checkpoint("qwen3_moe")  # I = 256: INT4 needs I/T % 128 == 0, so T = 4 fails
    code, _, err = main("convert", str(src), str(tmp_path / "kt"), "--to", "kt-int4", "--numa", "4")
    assert code == 2
    assert "AMXINT4 with --numa 4" in err and "use --numa 2" in err, err
    assert not (tmp_path / "kt").exists()


def _kt_run(src: Path, dst: Path, to: str, tp: int, kt_layout: str = "merged", batch: int = 0, **kw):
    """A kt conversion through the shared executor (API, no CLI); `batch` experts per GPU-style
    batch, run on the CPU (0: one at a time)."""
    from moeport.convert.batching import Batcher
    from moeport.convert.execute import execute
    from moeport.detect import detect
    from moeport.recipes import TARGETS, Options, job_recipe
    from moeport.sources import open_checkpoint

    target = TARGETS[to]
    options = Options(numa=tp, kt_layout=kt_layout)
    with open_checkpoint(src) as ck:
        det = detect(ck)
        recipe = job_recipe(target, options, ck, det)
        plan, sink = target.build(ck, det, options, {})
        batcher = Batcher("cpu", max_elements=batch * I_SIZE * H) if batch else None
        execute(plan, ck, dst, sink, batcher=batcher, recipe=recipe, **kw)
        return batcher


def test_preflight_disk_and_memory(kt_checkpoint, tmp_path, monkeypatch):
    from moeport.convert import destination
    from moeport.errors import MoeportError

    src = kt_checkpoint("glm_moe_dsa")
    monkeypatch.setattr(destination, "free_bytes", lambda p: 1000)
    no_room = r"not enough disk space: the output needs \d+(\.\d+)? MB, .* has 1 KB free"
    with pytest.raises(MoeportError, match=no_room):
        _kt_run(src, tmp_path / "kt", "kt-int4", 1)
    monkeypatch.undo()
    with pytest.raises(MoeportError, match=r"--max-memory 1 MB: this conversion needs about \d+ MB"):
        _kt_run(src, tmp_path / "kt2", "kt-int4", 1, max_memory=10**6)
    assert not (tmp_path / "kt").exists() and not staging_of(tmp_path / "kt").exists()
    assert not (tmp_path / "kt2").exists() and not staging_of(tmp_path / "kt2").exists()


def test_fused_gate_up_shape_is_checked(main, kt_checkpoint, tmp_path):
    """A transposed fused gate_up [E, H, 2I] is refused (kt's own script converts it to garbage)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "bad"
    shutil.copytree(kt_checkpoint("qwen3_moe"), src)
    tensors = load_file(str(src / "model.safetensors"))
    for key in [k for k in tensors if k.endswith("experts.gate_up_proj")]:
        tensors[key] = tensors[key].transpose(1, 2).contiguous()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = main("convert", str(src), str(tmp_path / "kt"), "--to", "kt-int8")
    assert code == 2 and "expected [E, 2I, H] = [4, 512, 256]" in err, err
    assert not (tmp_path / "kt").exists()


def test_dry_run_writes_nothing(main, kt_checkpoint, tmp_path):
    code, out, err = main(
        "convert", str(kt_checkpoint("glm_moe_dsa")), str(tmp_path / "kt"), "--to", "kt-int4", "--dry-run"
    )
    assert code == 0, err
    assert "AMXINT4 T=1 merged: 2 MoE layers x 4 experts, H=256 I=256" in out
    assert not (tmp_path / "kt").exists()


def test_destination_may_not_hold_the_source(main, kt_checkpoint):
    src = kt_checkpoint("minimax_m2")
    for dst in (src, src.parent):
        code, _, err = main("convert", str(src), str(dst), "--to", "kt-int4", "--overwrite")
        assert code == 2 and "contains) the source" in err, err
    assert (src / "model.safetensors").exists()


def test_mtp_layer_experts_are_converted(main, kt_checkpoint, tmp_path):
    """DeepSeek's MTP layer (index num_hidden_layers) has routed experts: they are converted as well."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "mtp"
    shutil.copytree(kt_checkpoint("deepseek_v3"), src)
    tensors = load_file(str(src / "model.safetensors"))
    mtp = {k.replace("layers.2.", "layers.3."): v.clone() for k, v in tensors.items() if "layers.2." in k}
    tensors.update(mtp)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    dst = tmp_path / "kt"
    convert(main, src, dst, "--to", "kt-int4", "--quiet")
    weight_map = json.loads((dst / INDEX_NAME).read_text())["weight_map"]
    assert weight_map[L.merged_key(3, "down", 3, 0, "scale")] == "model-kt-layer-00003.safetensors"
    assert not [k for k in weight_map if k.startswith("model.layers.3.mlp.experts.")]
    assert torch.equal(
        _read_merged(dst, L.merged_key(3, "up", 1, 0, "weight")),
        _read_merged(dst, L.merged_key(2, "up", 1, 0, "weight")),
    )


@pytest.mark.parametrize(
    "model_type,block,to,kt_layout",
    [("deepseek_v3", None, "kt-int4", "merged"), ("qwen3_moe", (128, 128), "kt-int8", "folders")],
)
def test_batched_experts_write_the_same_bytes(kt_checkpoint, tmp_path, model_type, block, to, kt_layout):
    """The GPU path's way (a stack of experts decoded and quantized together, torch kernels), run
    here on the CPU with 3 experts per batch, equals the one-expert-at-a-time path byte for byte."""
    src = kt_checkpoint(model_type, block)
    trees = []
    for batch in (0, 3):
        batcher = _kt_run(src, tmp_path / f"batch-{batch}", to, 2, kt_layout, batch)
        if batch:
            assert batcher.jobs_run > batcher.batches_run > 0  # it did batch
        trees.append(_tree(tmp_path / f"batch-{batch}"))
    assert trees[0] and trees[0] == trees[1]


@pytest.mark.parametrize("batch", [0, 3])
def test_nan_in_one_expert_is_named(kt_checkpoint, tmp_path, batch):
    """A NaN in one expert stops the conversion, one at a time or batched, naming that expert."""
    import shutil

    from safetensors.torch import load_file, save_file

    from moeport.errors import MoeportError

    src = tmp_path / "src"
    shutil.copytree(kt_checkpoint("deepseek_v3"), src)
    key = "model.layers.1.mlp.experts.2.up_proj.weight"
    shard = next(f for f in sorted(src.glob("*.safetensors")) if key in load_file(str(f)))
    tensors = load_file(str(shard))
    tensors[key][7, 3] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(
        MoeportError,
        match=r"^blk\.1\.ffn_up_exps\.2\.numa\.0: row 7 contains NaN or Inf \(1 row\(s\) in all\)",
    ):
        _kt_run(src, tmp_path / "out", "kt-int4", 1, batch=batch)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type,kt_layout", [("deepseek_v3", "merged"), ("qwen3_moe", "folders")])
def test_threads_write_the_same_bytes(main, kt_checkpoint, tmp_path, model_type, kt_layout):
    """FP8 decoded once per expert and shared by its NUMA slices, encoded on 1 or 3 threads: the
    same files, byte for byte (moeport.parallel)."""
    src = kt_checkpoint(model_type, (128, 64))
    trees = []
    for n in ("1", "3"):
        dst = tmp_path / n
        convert(main, src, dst, "--to", "kt-int4", "--numa", "2", "--kt-layout", kt_layout, "--threads", n)
        trees.append({str(p.relative_to(dst)): p.read_bytes() for p in sorted(dst.rglob("*")) if p.is_file()})
    assert len(trees[0]) > 2 and trees[0] == trees[1]
