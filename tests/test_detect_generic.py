"""The generic per-expert fallback (detect/generic.py): a MoE checkpoint whose model_type
transformers does not know (Ling's `bailing_moe`, MiniMax-M1's `minimax_m1`), its experts under a
reference family's per-expert Hub names. Tiny models are written by transformers' own classes,
then given the unknown model_type (and Ling's config names and router bias); the outputs are read
back by verify (and kt's own layout by moeport's kt reader)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fixtures import COMMON, FAMILY_CONFIGS, load_tensors
from safetensors.torch import save_file
from test_cli import run_cli
from test_public_names import assert_verified
from test_zoo_derived import _convert

from moeport.detect import detect
from moeport.errors import MoeportError
from moeport.sources import open_checkpoint

EXPERTS, PER_TOKEN, LAYERS = 4, 2, 3
H = INTER = 128  # kt-kernel's AMX INT4 takes multiples of 128


def _build(model_type: str, out: Path, seed: int, inter: str, fused: bool = False, **config) -> Path:
    """A tiny seeded model of `model_type` saved by transformers (Hub names, or with `fused` its
    own 3-D stacks), experts H x I, `config` overrides on top."""
    from transformers import AutoConfig, AutoModelForCausalLM

    over = {**COMMON, **FAMILY_CONFIGS[model_type], "hidden_size": H, inter: INTER, **config}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **over)).to(torch.bfloat16)
    with torch.no_grad():  # never zeros or ones from init
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(out, save_original_format=not fused)
    return out


def _retype(
    src: Path, model_type: str, config: dict, extra: dict[str, tuple[int, ...]], layers=range(LAYERS)
) -> Path:
    """`src` with config.json's model_type (and `config` keys: None drops one) replaced and seeded
    random tensors named by `extra` (with {L}: in each of `layers`) added beside the others
    (a router bias in float32, as Ling stores it)."""
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type=model_type, architectures=[f"{model_type}ForCausalLM"])
    for key, value in config.items():
        cfg.pop(key, None) if value is None else cfg.update({key: value})
    (src / "config.json").write_text(json.dumps(cfg))
    tensors = load_tensors(src)
    g = torch.Generator().manual_seed(7)
    for name, shape in extra.items():
        dtype = torch.float32 if name.endswith("bias") else torch.bfloat16
        for L in layers if "{L}" in name else [None]:
            tensors[name.replace("{L}", str(L))] = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


def _ling(tmp_path: Path) -> Path:
    """Qwen3-MoE's classes' save (layer 0 dense), as Ling 2.0 names its config and router bias, plus
    a shared expert."""
    src = _build("qwen3_moe", tmp_path / "ling", 3, "moe_intermediate_size", mlp_only_layers=[0])
    hidden, inter = H, INTER
    extra = {"model.layers.{L}.mlp.gate.expert_bias": (EXPERTS,)}
    extra |= {
        f"model.layers.{{L}}.mlp.shared_experts.{p}_proj.weight": (inter, hidden) for p in ("gate", "up")
    }
    extra["model.layers.{L}.mlp.shared_experts.down_proj.weight"] = (hidden, inter)
    ling = {
        "num_shared_experts": 1,
        "first_k_dense_replace": 1,
        "mlp_only_layers": None,
        "num_local_experts": None,
        "num_experts": EXPERTS,
    }
    return _retype(src, "bailing_moe", ling, extra, layers=range(1, LAYERS))


def _minimax(tmp_path: Path) -> Path:
    """Mixtral's classes' save (`block_sparse_moe.experts.{E}.w1/w3/w2`) typed as MiniMax-M1."""
    src = _build("mixtral", tmp_path / "minimax", 4, "intermediate_size")
    return _retype(src, "minimax_m1", {}, {})


@pytest.fixture(params=["ling", "minimax"])
def unknown(request, tmp_path: Path) -> Path:
    return {"ling": _ling, "minimax": _minimax}[request.param](tmp_path)


def test_inspect_finds_the_experts_of_an_unknown_model_type(unknown: Path) -> None:
    det = detect(open_checkpoint(unknown))
    assert det.family.generic and det.model_type in det.family.title
    assert det.experts_per_layer == EXPERTS and det.experts_per_token == PER_TOKEN
    dense = [0] if det.model_type == "bailing_moe" else []  # Ling's first_k_dense_replace
    assert det.dense_layers == dense and det.moe_layers == list(range(len(dense), LAYERS))
    assert det.layout.kind == "per-expert" and not any("dense" in w for w in det.warnings)
    assert det.expert_intermediate_size == INTER and det.hidden_size == H
    assert any("no transformers class to check logits" in w for w in det.warnings)
    if det.model_type == "bailing_moe":
        assert "Qwen3Moe's" in det.family.title and det.shared_experts == 1
        assert det.router_tensors == [
            "model.layers.{L}.mlp.gate.weight",
            "model.layers.{L}.mlp.gate.expert_bias",
        ]
    else:
        assert "Mixtral's" in det.family.title and det.shared_experts == 0
        assert det.router_tensors == ["model.layers.{L}.block_sparse_moe.gate.weight"]
    if det.model_type == "bailing_moe":  # the CLI once (a subprocess costs seconds)
        result = run_cli("inspect", str(unknown))
        assert result.returncode == 0 and "generic per-expert MoE" in result.stdout, result.stderr
        assert "no transformers class to check logits" in " ".join(result.stdout.split()), result.stdout


def test_every_per_expert_target_converts_and_verifies(unknown: Path, tmp_path: Path) -> None:
    """hub -> hub, -> linear (bf16), -> w4a16, -> fp8, -> kt-int4: written, the router bias
    carried as it is, verify passes (kt's experts named back through the recorded family)."""
    src = load_tensors(unknown)
    for to, options in (
        ("hf", {"layout": "hub"}),
        ("hf", {"layout": "linear", "dtype": "bf16"}),
        ("w4a16", {"group_size": 32}),
        ("fp8", {}),
        ("kt-int4", {}),
    ):
        out = _convert(unknown, tmp_path / f"out-{to}-{options.get('layout', '')}", to, **options)
        assert_verified(unknown, out)
        got = load_tensors(out)
        bias = "model.layers.1.mlp.gate.expert_bias"
        assert bias not in src or torch.equal(got[bias], src[bias]), to
    assert json.loads((tmp_path / "out-hf-linear" / "config.json").read_text())["model_type"] in (
        "bailing_moe",
        "minimax_m1",
    )


def test_fused_layout_and_gptq_refuse_in_one_line(tmp_path: Path) -> None:
    """No transformers class: nothing reads its fused layout, nothing runs its layers to calibrate."""
    src = _ling(tmp_path)
    result = run_cli("convert", str(src), str(tmp_path / "out"), "--to", "hf", "--layout", "fused", "--quiet")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--layout fused: " in lines[0] and "bailing_moe is unknown to transformers" in lines[0], lines[0]
    with pytest.raises(MoeportError, match="^--method gptq: .*bailing_moe is unknown to transformers") as e:
        _convert(src, tmp_path / "out", "w4a16", method="gptq", calibration=str(tmp_path / "ids.json"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "config.json").exists()


def _rewrite(src: Path, rename, keep_old: bool) -> None:
    """`src`'s tensors under the names `rename(key)` gives (beside the old names with keep_old)."""
    tensors = load_tensors(src)
    renamed = {rename(k): v.clone() for k, v in tensors.items()}
    save_file(({**tensors, **renamed} if keep_old else renamed), str(src / "model.safetensors"))


def _as_qwen(key: str) -> str:
    """Mixtral's expert names as Qwen3-MoE's (`block_sparse_moe.experts.{E}.w1` becomes
    `mlp.experts.{E}.gate_proj`)."""
    if ".block_sparse_moe.experts." not in key:
        return key
    key = key.replace(".block_sparse_moe.", ".mlp.")
    return next(
        (
            key.replace(a, b)
            for a, b in ((".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj."))
            if a in key
        )
    )


def test_no_or_several_matching_layouts_keep_the_unknown_family_error(tmp_path: Path) -> None:
    """Expert names of no reference family, fused 3-D stacks (orientation and gate/up order
    unknown), or names of two reference families at once: no family is picked."""
    odd = _ling(tmp_path)
    _rewrite(odd, lambda k: k.replace(".mlp.experts.", ".moe.routed."), keep_old=False)
    both = _minimax(tmp_path)
    _rewrite(both, _as_qwen, keep_old=True)
    stacks = _retype(
        _build("qwen3_moe", tmp_path / "stacks", 5, "moe_intermediate_size", fused=True), "x_moe", {}, {}
    )
    cases = ((odd, "none matched"), (stacks, "none matched"), (both, "several matched: Qwen3Moe, Mixtral"))
    for path, found in cases:
        with pytest.raises(MoeportError, match=f"unknown model family .*{found}"):
            detect(open_checkpoint(path))
    result = run_cli("inspect", str(odd))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "generic per-expert fallback tried" in result.stderr


def test_a_type_transformers_knows_gets_no_generic_family(tmp_path: Path) -> None:
    """Llama is known to transformers and has no experts: its own verdict stays."""
    src = tmp_path / "llama"
    shutil.copytree(_ling(tmp_path), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(
        MoeportError, match="unknown model family .*only for a model_type transformers does not"
    ):
        detect(open_checkpoint(src))


def test_without_transformers_a_derived_type_is_one_line(tmp_path: Path) -> None:
    """Families outside the zoo come from transformers' definitions; where it does not import, the
    CLI says so in one line (it was a ModuleNotFoundError traceback)."""
    import subprocess
    import sys

    src = _ling(tmp_path)
    code = (
        "import sys; sys.modules['transformers'] = None; "
        f"sys.argv = ['moeport', 'inspect', {str(src)!r}]; "
        "from moeport.cli.app import main; main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "transformers does not import here" in lines[0]
