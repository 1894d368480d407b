"""Every MoE model type of the installed transformers: derived (or zoo) families checked end to end.

For each model type transformers implements with experts, a tiny checkpoint is written by
transformers' own classes (`save_pretrained`, seeded random weights) and checked: moeport finds
the experts, hub -> fused -> hub is bit-identical, transformers' logits on the fused output equal
those on the source. Each goes through `--to w4a16` and `--to kt-int4` with verify passing (kt
takes transposed stacks through `--to hf --layout linear` first, and refuses expert biases; it
needs hidden and intermediate sizes in multiples of its blocks: 256, as tests/kt_support.py's users
take). Results are written to $MOEPORT_FAMILY_RESULTS (a JSON file) when set, which
bench/families_table.py turns into README's table.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import load_tensors
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file

from moeport.cli.convert import RunFlags, run_convert
from moeport.detect import detect
from moeport.errors import MoeportError
from moeport.recipes import Options
from moeport.sources import open_checkpoint
from moeport.verify.run import verify
from moeport.zoo.derived import derive_family
from moeport.zoo.support import moe_model_types, support
from moeport.zoo.tiny import EXPERTS, build_model, text_overrides, tiny_config

MOE_TYPES = moe_model_types()
MAX_PARAMS = 8_000_000  # a tiny model; a vision tower at transformers' default size is skipped
RESULTS: dict[str, dict[str, str]] = {}


def _record(model_type: str, job: str, result: str) -> None:
    RESULTS.setdefault(model_type, {})[job] = result
    path = os.environ.get("MOEPORT_FAMILY_RESULTS")
    if path:
        Path(path).write_text(json.dumps(RESULTS, indent=1, sort_keys=True))


def _convert(src: Path, dst: Path, to: str, **options) -> Path:
    run_convert(src, dst, to, Options(**options), RunFlags(False, True, True), Console(quiet=True))
    return dst


def _save_tiny(
    model_type: str, out: Path, hidden: int = 64, inter: int = 48, dense: int = 80, layers: int = 2
) -> Path:
    """transformers' tiny model of `model_type`, seeded, saved as transformers saves it (hub names)."""
    try:
        sizes = text_overrides(hidden=hidden, inter=inter, dense=dense, layers=layers)
        config = tiny_config(model_type, sizes)
        # counted on meta first: a sub-model left at transformers' default size (DeepSeek-OCR-2's
        # vision towers) would take the machine's whole memory on the CPU
        params = sum(p.numel() for p in build_model(config, "meta").parameters())
        if params <= MAX_PARAMS:
            torch.manual_seed(0)
            model = build_model(config, "cpu")
    except MoeportError as e:
        _record(model_type, "build", "skip")
        pytest.skip(f"transformers cannot instantiate it on CPU with tiny sizes: {e}")
    if params > MAX_PARAMS:
        _record(model_type, "build", "skip")
        pytest.skip(f"{params / 1e6:.0f}M parameters at transformers' default sub-model sizes")
    return _save_seeded(model, out)


def _save_seeded(model, out: Path, seed: int = 1) -> Path:
    """`model` in BF16 with seeded random weights everywhere (never zeros or ones from init),
    saved by transformers' `save_pretrained` (hub names)."""
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(out)
    return out


def _load(path: Path):
    """transformers' model class for the checkpoint, loaded by transformers (float32, eval)."""
    from transformers import AutoConfig

    cls = type(build_model(AutoConfig.from_pretrained(path), "meta"))
    model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return model.eval(), {k: v for k, v in info.items() if k != "error_msgs" and v}


def _logits(model) -> torch.Tensor:
    if model.main_input_name == "pixel_values":  # a vision backbone (VitPose+): its feature maps
        return _feature_maps(model)
    if type(model).forward is torch.nn.Module.forward:  # a wrapper without a forward (Qwen3-Omni)
        from transformers import PreTrainedModel

        subs = [m for m in model.children() if isinstance(m, PreTrainedModel)]  # Qwen3-Omni: its thinker
        model = next((m for m in subs if "input_ids" in inspect.signature(m.forward).parameters), model)
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # DiffusionGemma's forward draws its noise from torch's global generator
    # an encoder-decoder (Switch, NLLB-MoE) runs its decoder on the same ids
    decoder = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False, **decoder)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state  # base models


def _feature_maps(model) -> torch.Tensor:
    """A vision backbone's feature maps on seeded images, one per expert: VitPose+ picks each
    image's expert by its `dataset_index`, so every expert is run."""
    size = model.config.image_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(EXPERTS, model.config.num_channels, *size, generator=g)
    with torch.no_grad():
        out = model(pixel_values=pixels, dataset_index=torch.arange(EXPERTS))
    return torch.cat([f.flatten() for f in out.feature_maps])


def _assert_identical(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), f"{name}: bytes differ"


def _routed_only(tensors: dict[str, torch.Tensor], det) -> dict[str, torch.Tensor]:
    """The source but the zero-compute experts' gate/up that transformers 5.24 saves for
    LongCat-Flash and its Hub checkpoints do not hold (identity experts, never read): those are
    left out. transformers 5.25 allocates and saves none."""
    if not det.zero_experts:
        return tensors
    extra = {k for k in tensors if (m := re.search(r"\.experts\.(\d+)\.", k)) and int(m[1]) >= EXPERTS}
    assert all(k.endswith(("gate_proj.weight", "up_proj.weight")) for k in extra)
    assert len(extra) in (0, 2 * det.zero_experts * len(det.moe_layers))
    return {k: v for k, v in tensors.items() if k not in extra}


def test_every_moe_model_type_is_listed_with_its_support() -> None:
    rows = [support(mt) for mt in MOE_TYPES]
    # every type of the installed transformers is supported (VitPose+ was the last); a later
    # transformers may add types that are "not", each with its reason
    assert len(rows) > 50 and {"zoo", "derived"} <= {r.how for r in rows} <= {"zoo", "derived", "not"}
    for r in rows:
        assert r.why, r.model_type
        assert (r.family is None) == (r.how == "not"), r.model_type


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_moe_model_type_end_to_end(tmp_path: Path, model_type: str) -> None:
    found = support(model_type)
    _record(model_type, "support", found.how)
    if found.how == "not":
        pytest.skip(f"not supported: {found.why}")
    src = _save_tiny(model_type, tmp_path / "src")
    reference, info = _load(src)
    if info:  # transformers' own save_pretrained -> from_pretrained does not give its model back
        _record(model_type, "build", "skip")
        pytest.skip(
            f"transformers' own save does not load back: {sorted(info)} {list(info.values())[0]}"[:200]
        )
    with open_checkpoint(src) as ck:
        det = detect(ck)
    groups = len(det.family.fused.groups) or 1  # ERNIE-4.5-VL: a text and a vision group per layer
    assert det.experts_per_layer == EXPERTS * groups and det.moe_layers, model_type
    # a causal-LM class may save its text config's model_type (llama4 -> llama4_text)
    assert det.family == support(det.model_type).family
    _record(model_type, "inspect", "ok")

    # transformers saves the hub layout, or its memory layout where a fresh model has no hub form
    # to revert to (Qwen3-VL-MoE's [E, H, 2I] stacks): round trip through the other one
    other, same = ("fused", "hub") if det.layout == det.family.hub else ("hub", "fused")
    there = _convert(src, tmp_path / other, "hf", layout=other)
    back = _convert(there, tmp_path / same, "hf", layout=same)
    _assert_identical(_routed_only(load_tensors(src), det), load_tensors(back))
    _record(model_type, "round trip", "ok")

    fused = there if other == "fused" else src
    try:
        expected = _logits(reference)
    except Exception as e:  # transformers' own forward on its own tiny model: not ours to fix
        _record(model_type, "logits", "skip")
        pytest.skip(f"transformers' forward fails on the tiny source: {type(e).__name__}: {e}"[:200])
    model, info = _load(fused)
    assert not info, f"{model_type}: transformers loads the fused output with {info}"
    assert torch.equal(_logits(model), expected), f"{model_type}: logits differ on the fused output"
    _record(model_type, "logits", "ok")


@pytest.mark.parametrize("to", ["w4a16", "kt-int4"])
@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_quantizing_targets_verify(tmp_path: Path, model_type: str, to: str) -> None:
    found = support(model_type)
    if found.how == "not":
        pytest.skip(f"not supported: {found.why}")
    src = _save_tiny(model_type, tmp_path / "src", hidden=256, inter=256, dense=256)
    options = {"numa": 1} if to.startswith("kt") else {"group_size": 32}
    try:
        out = _convert(src, tmp_path / to, to, **options)
    except MoeportError as exc:
        if found.family.not_linear:  # Doge: experts carried as embeddings, never quantized or repacked
            out = _experts_not_linear(src, tmp_path, to, found.family.not_linear, exc)
            if out is None:
                _record(model_type, to, "refused (experts are embedding rows)")
                return
            assert verify(src, out).ok
            _record(model_type, to, "ok (--targets all-linear; expert embeddings kept)")
            return
        if to.startswith("kt") and "kt-kernel runs gated (SwiGLU) experts only" in str(exc):
            assert "\n" not in str(exc)  # ReLU experts (Switch, NLLB-MoE): refused in one line
            _record(model_type, to, "refused (not gated)")
            return
        # transposed/interleaved stacks: kt takes them as per-expert linears
        assert to.startswith("kt") and "--to hf --layout linear first" in str(exc), exc
        src = _convert(src, tmp_path / "linear", "hf", layout="linear")
        try:
            out = _convert(src, tmp_path / to, to, **options)
        except MoeportError as biased:  # GPT-OSS: kt's AMX experts have no bias term
            assert "no bias term" in str(biased), biased
            _record(model_type, to, "refused (expert biases)")
            return
    report = verify(src, out)
    assert report.ok, [r.name for r in report.flagged][:5]
    _record(model_type, to, "ok")


def _experts_not_linear(src: Path, tmp_path: Path, to: str, why: str, exc: MoeportError) -> Path | None:
    """A family whose routed experts are no linear layers (Doge's embedding rows): kt and w4a16's
    default `--targets experts` refuse in one line saying so; `--targets all-linear` quantizes the
    other linears and carries the experts' tables bit for bit."""
    assert why in str(exc) and "\n" not in str(exc), exc
    if to.startswith("kt"):
        assert "kt-kernel runs linear experts" in str(exc)
        return None
    assert "no weight matches --targets experts" in str(exc)
    # group 16: Doge's tiny dt_proj has 16 input columns
    out = _convert(src, tmp_path / "all-linear", to, group_size=16, targets="all-linear")
    with open_checkpoint(src) as ck:
        det = detect(ck)
    tables = [t.replace("{L}", str(L)) for t in det.expert_tensors for L in det.moe_layers]
    source, written = load_tensors(src), load_tensors(out)
    assert tables and all(torch.equal(written[t], source[t]) for t in tables)
    assert any(k.endswith("weight_packed") for k in written)
    return out


def test_qwen3_vl_moe_hub_stacks_are_transposed_and_convert_both_ways(tmp_path: Path) -> None:
    """Qwen3-VL-MoE ships `[E, H, 2I]` stacks (transformers transposes them on load): moeport reads
    that form as the hub layout, writes transformers' `[E, 2I, H]` and gives the Hub form back."""
    saved = _save_tiny("qwen3_vl_moe", tmp_path / "saved")  # transformers saves its memory layout
    hub = tmp_path / "hub"
    hub.mkdir()
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    stacks = [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert stacks
    save_file(
        {k: v.transpose(1, 2).contiguous() if k in stacks else v for k, v in tensors.items()},
        str(hub / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (hub / "config.json").write_text((saved / "config.json").read_text())
    assert torch.equal(_logits(_load(hub)[0]), _logits(_load(saved)[0]))  # transformers reads both alike
    with open_checkpoint(hub) as ck:
        det = detect(ck)
    assert det.layout == derive_family("qwen3_vl_moe").hub and det.layout.transposed
    fused = _convert(hub, tmp_path / "fused", "hf", layout="fused")
    _assert_identical(tensors, load_tensors(fused))
    _assert_identical(load_tensors(hub), load_tensors(_convert(fused, tmp_path / "back", "hf", layout="hub")))


def test_multimodal_wrapper_of_a_zoo_text_model(checkpoint, tmp_path: Path) -> None:
    """Kimi-K2.5-style: DeepSeek-V3 text under `language_model.`, a vision tower beside it; the
    experts are found and converted, the vision tensors carried over untouched."""
    src, wrapped = checkpoint("deepseek_v3", "hub"), tmp_path / "kimi-k25-like"
    wrapped.mkdir()
    tensors = {f"language_model.{k}": v for k, v in load_tensors(src).items()}
    g = torch.Generator().manual_seed(5)
    vision = {
        "vision_tower.patch_embed.proj.weight": torch.randn(32, 3, 4, 4, generator=g).bfloat16(),
        "mm_projector.proj.0.weight": torch.randn(64, 32, generator=g).bfloat16(),
    }
    save_file({**tensors, **vision}, str(wrapped / "model.safetensors"), metadata={"format": "pt"})
    text = json.loads((src / "config.json").read_text())
    config = {
        "model_type": "kimi_k25",
        "architectures": ["KimiK25ForConditionalGeneration"],
        "text_config": text,
    }
    (wrapped / "config.json").write_text(json.dumps(config))
    with open_checkpoint(wrapped) as ck:
        det = detect(ck)
    assert det.family.name == "deepseek_v3" and det.layer_prefix == "language_model.model.layers.{L}."
    fused = load_tensors(_convert(wrapped, tmp_path / "fused", "hf", layout="fused"))
    assert "language_model.model.layers.1.mlp.experts.gate_up_proj" in fused
    for name, value in vision.items():
        assert torch.equal(fused[name], value)
    back = _convert(tmp_path / "fused", tmp_path / "hub", "hf", layout="hub")
    _assert_identical(load_tensors(wrapped), load_tensors(back))


@pytest.mark.parametrize("model_type", ["llama4_text", "qwen3_vl_moe"])
def test_fused_hub_stacks_to_per_expert_linears_and_back(tmp_path: Path, model_type: str) -> None:
    """Llama-4 and Qwen3-VL-MoE keep [E, H, 2I] stacks (gate columns first, then up, as their
    forward's `chunk(2, dim=-1)` reads them): per-expert `gate_proj/up_proj/down_proj` [I, H]
    linears come out, and fusing them again gives the stacks back bit for bit."""
    src = _save_tiny(model_type, tmp_path / "src")
    with open_checkpoint(src) as ck:
        det = detect(ck)
    if not det.layout.transposed:  # Qwen3-VL-MoE: transformers saves [E, 2I, H]; the Hub's form first
        src = _convert(src, tmp_path / "hub-form", "hf", layout="hub")
    stacks = load_tensors(src)
    linear = load_tensors(_convert(src, tmp_path / "linear", "hf", layout="linear"))
    gate_up = next(
        v for k, v in stacks.items() if k.endswith("layers.1." + det.layout.block + ".experts.gate_up_proj")
    )
    inter = gate_up.shape[-1] // 2
    block = next(k for k in linear if k.endswith(".experts.3.gate_proj.weight") and "layers.1." in k)
    assert torch.equal(linear[block], gate_up[3, :, :inter].T)
    assert torch.equal(linear[block.replace("gate_proj", "up_proj")], gate_up[3, :, inter:].T)
    back = _convert(tmp_path / "linear", tmp_path / "back", "hf", layout="hub")
    _assert_identical(stacks, load_tensors(back))


ZOO_ONLY = {  # what the zoo knows that transformers' definitions do not give (why each entry stays)
    "gpt_oss": "gate/up interleaved, expert biases, MXFP4 `_blocks`",
    "deepseek_v4": "DeepSeek's public names (`attn.kv_norm`, `mtp.{L}.`) and expert_dtype",
    "kimi_k2": "not a transformers model_type (DeepSeek-V3 classes)",
    "dbrx": "2-D [E * I, H] expert parameters, nested ffn_config, no per-expert form in transformers",
    "longcat_flash": "zero-compute experts: transformers' gate_up_proj holds E + Z, the Hub E",
    "doge": "experts are embedding rows; which is the input row only DogeCDMoE's forward says",
    "step3p5": "Step-3.5-Flash's hub names: transformers maps them for `step3p7` only",
}


def test_zoo_expert_layouts_agree_with_transformers() -> None:
    """Each zoo entry's expert layouts and renames are what derivation reads off transformers,
    except where the zoo says more (ZOO_ONLY); optional router biases may differ."""
    from moeport.zoo.families import FAMILIES

    for family in FAMILIES:
        for model_type in family.model_types:
            if model_type in ZOO_ONLY:
                continue
            derived = derive_family(model_type)
            for field in ("hub", "fused", "linear", "fused_renames", "router", "shared_expert"):
                assert getattr(derived, field) == getattr(family, field), (model_type, field)


def test_shared_expert_count_is_read_under_the_configs_own_name(tmp_path: Path) -> None:
    """ERNIE-4.5 states its shared experts as `moe_num_shared_experts` (2 on the Hub and in
    transformers' defaults); inspect said 1, the count it assumes where a config states none."""
    src = _save_tiny("ernie4_5_moe", tmp_path / "src")
    stated = json.loads((src / "config.json").read_text())["moe_num_shared_experts"]
    with open_checkpoint(src) as ck:
        det = detect(ck)
    assert stated == 2 and det.shared_experts == stated


def test_inspect_says_dash_for_a_size_the_config_does_not_state(tmp_path: Path) -> None:
    """Doge's experts are embedding rows: no intermediate size, shown as '-' rather than None."""
    src = _save_tiny("doge", tmp_path / "src")
    out = subprocess.run(
        [sys.executable, "-m", "moeport", "inspect", str(src)], capture_output=True, text=True, check=True
    ).stdout
    assert "None" not in out and re.search(r"expert\s+(│\s+)*intermediate -", out), out


def test_every_zoo_entry_says_what_transformers_lacks() -> None:
    """The zoo keeps only what derivation does not give: each entry says why it is data."""
    from moeport.zoo.families import FAMILIES

    assert all(f.zoo_because for f in FAMILIES), [f.name for f in FAMILIES if not f.zoo_because]
    for model_type in ("qwen2_moe", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "minimax_m2", "minimax"):
        assert support(model_type).how == "derived", model_type  # pruned: derivation reproduces them


def test_llama4_multimodal_checkpoint_converts_with_its_vision_tower_untouched(tmp_path: Path) -> None:
    """Llama-4 as transformers saves the multimodal model (`language_model.model.layers.{L}.`,
    `vision_model.`, `multi_modal_projector.`): the text experts are found under the wrapper,
    converted to per-expert linears and back bit for bit, and the fused output runs in transformers
    with the source's logits."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(tiny_config("llama4")).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    src = load_tensors(tmp_path / "src")
    with open_checkpoint(tmp_path / "src") as ck:
        det = detect(ck)
    assert det.layer_prefix == "language_model.model.layers.{L}." and det.layout.transposed
    linear = load_tensors(_convert(tmp_path / "src", tmp_path / "linear", "hf", layout="linear"))
    assert "language_model.model.layers.1.feed_forward.experts.3.down_proj.weight" in linear
    assert all(torch.equal(linear[k], v) for k, v in src.items() if not k.startswith("language_model."))
    _assert_identical(src, load_tensors(_convert(tmp_path / "linear", tmp_path / "back", "hf", layout="hub")))
    fused = _convert(tmp_path / "linear", tmp_path / "fused", "hf", layout="fused")
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    logits = []
    for path in (tmp_path / "src", fused):
        loaded = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            # the wrapper's own forward without images fails in transformers 5.24 (image_outputs)
            logits.append(loaded.language_model(input_ids=ids, use_cache=False).logits)
    assert torch.equal(logits[0], logits[1])
