"""`--to gguf` keeps numbers the source already holds (recipes/gguf_stored.py): MXFP4 experts are
re-packed into GGML's MXFP4 blocks, a GGUF's rows of the requested type are copied; and NaN/Inf
weights are refused before they reach a GGML block (convert.encode.refuse_nonfinite).

Checked by gguf-py (reader, `gguf.quants`), moeport verify, and byte comparison of whole files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from fixtures import build_transformers_checkpoint, load_tensors
from gguf_support import read_gguf
from safetensors.torch import save_file

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.$")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return build_transformers_checkpoint("qwen3_moe", "hub", tmp_path_factory.mktemp("qwen") / "src", seed=7)


def _ct_experts(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GGUF stack name -> the compressed-tensors MXFP4 codes [E, N, K] and E8M0 bytes [E, N, K/32]."""
    tensors = load_tensors(path)
    stacks: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for name, packed in tensors.items():
        if not name.endswith(".weight_packed"):
            continue
        m = EXPERT.match(name.removesuffix("weight_packed"))
        assert m, name
        b = packed.numpy()
        codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(*b.shape[:-1], -1)  # element 2j low
        scale = tensors[name.replace("weight_packed", "weight_scale")].numpy()
        stacks.setdefault(f"blk.{m[1]}.ffn_{m[3]}_exps.weight", {})[int(m[2])] = (codes, scale)
    return {k: tuple(np.stack([v[e][i] for e in sorted(v)]) for i in (0, 1)) for k, v in stacks.items()}


def test_mxfp4_experts_are_repacked_not_requantized(main, qwen, tmp_path):
    import gguf

    assert main("convert", qwen, tmp_path / "ct", "--to", "mxfp4", "--quiet")[0] == 0
    code, out, err = main(
        "convert", tmp_path / "ct", tmp_path / "g", "--to", "gguf", "--gguf-type", "mxfp4", "--dry-run"
    )
    assert code == 0, err
    plan = " ".join(out.split())
    assert "copied as stored (ct-mxfp4 -> MXFP4, no requantizing): blk.*.ffn_down_exps.weight, " in plan
    assert re.search(r"quantized to Q8_0: blk\.\*\.attn_k\.weight, [^-]*token_embd\.weight", plan)
    assert (
        main("convert", tmp_path / "ct", tmp_path / "g", "--to", "gguf", "--gguf-type", "mxfp4", "--quiet")[0]
        == 0
    )

    ours = read_gguf(tmp_path / "g" / "model.gguf")
    source = _ct_experts(tmp_path / "ct")
    assert len(source) == 3 * 3
    mxfp4 = gguf.GGMLQuantizationType.MXFP4
    for name, (codes, scale) in source.items():
        kind, data = ours[name]
        assert kind == "MXFP4", name
        # the same numbers: OCP MX's value of each code and E8M0 byte, as gguf-py decodes ours
        want = E2M1[codes] * np.exp2(np.repeat(scale.astype(np.float32) - 127, 32, axis=-1))
        assert np.array_equal(gguf.quants.dequantize(data, mxfp4), want), name
        # and the bytes ggml's own quantizer gives that weight, in every block where its choice is
        # not ambiguous (a block whose largest code is 4 or 6 fixes the exponent; -0 codes are +0 to it)
        blocks = data.reshape(*codes.shape[:-1], -1, 17)
        ref = gguf.quants.quantize(want, mxfp4).reshape(blocks.shape)
        g = codes.reshape(*codes.shape[:-1], -1, 32)
        clear = ((g & 7).max(-1) >= 6) & ~(g == 8).any(-1)
        assert clear.mean() > 0.1  # seeded: about a fifth of them under compressed-tensors' scale choice
        assert np.array_equal(blocks[clear], ref[clear]), name

    code, out, err = main("verify", tmp_path / "ct", tmp_path / "g", "--json", "--quiet")
    assert code == 0, err
    report = json.loads(out)
    experts = [t for t in report["tensors"] if ".experts." in t["name"]]
    assert len(experts) == 3 * 3 * 4 and all(t["exact"] for t in experts)

    # and a GGUF's MXFP4 experts into MXFP4 again: the very same file
    g2 = tmp_path / "g2"
    assert (
        main("convert", tmp_path / "g" / "model.gguf", g2, "--to", "gguf", "--gguf-type", "mxfp4", "--quiet")[
            0
        ]
        == 0
    )
    assert (g2 / "model.gguf").read_bytes() == (tmp_path / "g" / "model.gguf").read_bytes()


@pytest.mark.parametrize(
    ("model_type", "gguf_type"), [("qwen3_moe", "q8_0"), ("qwen3_moe", "q4_0"), ("mixtral", "q8_0")]
)
def test_gguf_to_gguf_of_the_same_type_is_byte_identical(main, qwen, tmp_path, model_type, gguf_type):
    """Mixtral (llama arch): q/k rows too; llama.cpp's RoPE permutation is undone on read and
    redone on the rows of blocks."""
    other = model_type != "qwen3_moe"
    src = build_transformers_checkpoint(model_type, "hub", tmp_path / "s") if other else qwen
    first, second = tmp_path / "a", tmp_path / "b"
    assert main("convert", src, first, "--to", "gguf", "--gguf-type", gguf_type, "--quiet")[0] == 0
    code, out, err = main(
        "convert", first / "model.gguf", second, "--to", "gguf", "--gguf-type", gguf_type, "--dry-run"
    )
    assert code == 0, err
    plan = " ".join(out.split())
    kind = gguf_type.upper()
    assert f"copied as stored (gguf -> {kind}, no requantizing): blk.*.attn_k.weight" in plan
    assert "dequantized" not in plan and "quantized to" not in plan
    assert (
        main("convert", first / "model.gguf", second, "--to", "gguf", "--gguf-type", gguf_type, "--quiet")[0]
        == 0
    )
    assert (second / "model.gguf").read_bytes() == (first / "model.gguf").read_bytes()


@pytest.mark.parametrize("gguf_type", ["q8_0", "mxfp4"])
def test_nonfinite_weights_are_refused_naming_the_tensor(main, qwen, tmp_path, gguf_type):
    weight = "model.layers.1.mlp.experts.3.up_proj.weight"
    src = tmp_path / "src"
    src.mkdir()
    for f in qwen.iterdir():
        if f.suffix != ".safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    tensors = load_tensors(qwen)
    tensors[weight] = tensors[weight].clone()
    tensors[weight][5, 7] = float("nan")
    tensors[weight][9, 1] = float("-inf")
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    dst = tmp_path / "out"
    code, _, err = main("convert", src, dst, "--to", "gguf", "--gguf-type", gguf_type, "--quiet")
    assert code == 2
    line = err.strip()
    assert "\n" not in line and "Traceback" not in err and not dst.exists()
    assert line.startswith(f"error: {weight.removesuffix('.weight')} (GGUF blk.1.ffn_up_exps, expert 3): ")
    assert "2 NaN/Inf value(s) in 2 row(s), first in row 5" in line and "--allow-nonfinite" in line
    code, _, err = main(
        "convert", src, dst, "--to", "gguf", "--gguf-type", gguf_type, "--quiet", "--allow-nonfinite"
    )
    assert code == 0, err
    assert (dst / "model.gguf").is_file()
