"""`--to nvfp4 --input-scales FILE`: W4A4 NVFP4 with static input scales from a calibration file.

The file comes from a real calibration run: forward hooks on the BF16 model transformers builds
(per-expert inputs computed from its fused experts' routing). Checked against compressed-tensors'
own `generate_gparam` and preset `NVFP4` activation args, against ModelOpt's `input_scale`
convention, and by transformers' loader.
"""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import load_tensors
from safetensors.torch import save_file
from test_convert_fp4 import here, raw
from test_convert_gpu import load, logits
from test_convert_kt import main  # noqa: F401 - fixture

from moeport.errors import MoeportError


def calibrate(path) -> dict[str, float]:
    """max |x| at the input of every Linear and of every routed expert's gate/up/down."""
    model = load(path)
    maxima: dict[str, float] = {}

    def note(name: str, x: torch.Tensor) -> None:
        maxima[name] = max(maxima.get(name, 0.0), float(x.abs().max()))

    def experts_hook(name):
        def hook(mod, args):
            x, routed = args[0], args[1]
            for e in range(mod.gate_up_proj.shape[0]):
                tokens = (routed == e).any(-1)
                if tokens.any():
                    gate, up = (x[tokens] @ mod.gate_up_proj[e].T).chunk(2, dim=-1)
                    note(f"{name}.{e}.gate_proj", x[tokens])
                    note(f"{name}.{e}.up_proj", x[tokens])
                    note(f"{name}.{e}.down_proj", mod.act_fn(gate) * up)

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(lambda m, args, name=name: note(name, args[0]))
        elif name.endswith("mlp.experts"):
            mod.register_forward_pre_hook(experts_hook(name))
    with torch.no_grad():
        logits(model)
    return maxima


@pytest.fixture(scope="module")
def calibrated(checkpoint, tmp_path_factory):
    src = checkpoint("qwen3_moe")
    root = tmp_path_factory.mktemp("w4a4")
    maxima = calibrate(src)
    (root / "cal.json").write_text(json.dumps(maxima))
    return src, root, maxima


def shared_amax(maxima: dict[str, float], module: str) -> float:
    """The amax a module's input scale is made from: its fused set's largest."""
    for a, *others in (("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj")):
        for proj in (a, *others):
            if module.endswith(f".{proj}"):
                stem = module.removesuffix(proj)
                return max(maxima[stem + p] for p in (a, *others))
    return maxima[module]


def test_compressed_tensors_w4a4_as_compressed_tensors_reads_it(calibrated) -> None:
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils import generate_gparam
    from transformers import AutoModelForCausalLM

    src, root, maxima = calibrated
    here(src, root / "ct", "nvfp4", input_scales=str(root / "cal.json"))
    here(src, root / "a16", "nvfp4")
    ours, a16 = load_tensors(root / "ct"), load_tensors(root / "a16")
    scales = {k.removesuffix(".input_global_scale"): t for k, t in ours.items() if "input_global" in k}
    assert len(scales) == sum(k.endswith(".weight_packed") for k in ours) == 36
    for module, t in scales.items():  # compressed-tensors' own formula on the shared amax
        amax = torch.tensor(shared_amax(maxima, module))
        assert t.dtype == torch.float32 and torch.equal(t, generate_gparam(-amax, amax)), module
    gates = [m for m in scales if m.endswith("gate_proj")]
    assert gates and all(torch.equal(scales[m], scales[m.replace("gate_proj", "up_proj")]) for m in gates)
    assert all(torch.equal(raw(ours[k]), raw(t)) for k, t in a16.items())  # weights as weight-only
    cfg = json.loads((root / "ct" / "config.json").read_text())["quantization_config"]
    args = QuantizationConfig.model_validate(cfg).config_groups["group_0"].input_activations
    assert args == PRESET_SCHEMES["NVFP4"]["input_activations"]
    # transformers' fused experts run no activation quantization: the experts' input scales are the
    # only keys it leaves unread (vLLM/SGLang read them as w13/w2_input_global_scale)
    model, info = AutoModelForCausalLM.from_pretrained(
        root / "ct", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert set(info["unexpected_keys"]) == {f"{m}.input_global_scale" for m in scales}
    assert torch.equal(logits(model.eval()), logits(load(root / "a16")))


def test_modelopt_w4a4_input_scale_and_parent_keys(calibrated, tmp_path) -> None:
    src, root, maxima = calibrated
    experts = {k: v for k, v in maxima.items() if ".experts." not in k}
    for layer in range(3):  # one absmax for all experts of a layer, as a hook on the fused module sees
        experts[f"model.layers.{layer}.mlp.experts"] = max(
            v for k, v in maxima.items() if f"{layer}.mlp.ex" in k
        )
    (tmp_path / "cal.json").write_text(json.dumps(experts))
    out = tmp_path / "mo"
    here(src, out, "nvfp4", flavor="modelopt", targets="all-linear", input_scales=str(tmp_path / "cal.json"))
    t = load_tensors(out)
    q = "model.layers.1.self_attn."
    amax = max(maxima[q + p] for p in ("q_proj", "k_proj", "v_proj"))
    expected = (torch.tensor(amax) / torch.tensor(6 * 448.0)).reshape(())  # NVFP4QTensor's convention
    assert all(torch.equal(t[f"{q}{p}.input_scale"], expected) for p in ("q_proj", "k_proj", "v_proj"))
    e = t["model.layers.2.mlp.experts.3.down_proj.input_scale"]
    assert float(e) == pytest.approx(experts["model.layers.2.mlp.experts"] / 2688, rel=1e-6)
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (
        quant["quant_algo"] == cfg["quant_algo"] == "NVFP4"
        and "input_activations" in cfg["config_groups"]["group_0"]
    )


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (
            lambda m: m.pop("model.layers.0.mlp.experts.1.up_proj"),
            "no input absmax for model.layers.0.mlp.experts.1.up_proj",
        ),
        (
            lambda m: m.update({"model.layers.0.mlp.expert.1.up_proj": 1.0}),
            "model.layers.0.mlp.expert.1.up_proj names no module",
        ),
        (
            lambda m: m.update({"model.layers.0.self_attn.q_proj": -1.0}),
            "q_proj: -1.0 is not a positive finite",
        ),
    ],
    ids=["missing", "typo", "negative"],
)
def test_bad_calibration_files_are_refused(calibrated, tmp_path, edit, error) -> None:
    src, _, maxima = calibrated
    bad = dict(maxima)
    edit(bad)
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(MoeportError, match=error.replace(".", r"\.")):
        here(src, tmp_path / "out", "nvfp4", input_scales=str(tmp_path / "bad.json"))
    assert not (tmp_path / "out").exists()


def test_safetensors_calibration_file_gives_the_json_bytes(calibrated, tmp_path) -> None:
    src, root, maxima = calibrated
    save_file({k: torch.tensor([v]) for k, v in maxima.items()}, str(tmp_path / "cal.safetensors"))
    here(src, tmp_path / "st", "nvfp4", input_scales=str(tmp_path / "cal.safetensors"))
    here(src, tmp_path / "js", "nvfp4", input_scales=str(root / "cal.json"))
    a, b = load_tensors(tmp_path / "st"), load_tensors(tmp_path / "js")
    assert sorted(a) == sorted(b) and all(torch.equal(raw(a[k]), raw(b[k])) for k in a)


def test_cli_takes_input_scales_for_nvfp4_only(main, calibrated, tmp_path) -> None:  # noqa: F811
    src, root, _ = calibrated
    cal = str(root / "cal.json")
    code, out, _ = main(
        "convert", str(src), str(tmp_path / "a"), "--to", "nvfp4", "--input-scales", cal, "--dry-run"
    )
    assert code == 0 and "static input scales" in out
    code, _, err = main("convert", str(src), str(tmp_path / "b"), "--to", "mxfp4", "--input-scales", cal)
    assert code == 2 and "--input-scales: not an option of --to mxfp4" in err
    missing = str(tmp_path / "none.json")
    code, _, err = main("convert", str(src), str(tmp_path / "c"), "--to", "nvfp4", "--input-scales", missing)
    assert code == 2 and f"--input-scales {missing}: cannot read it" in err
    assert not any((tmp_path / d).exists() for d in "abc")
