"""The calibration parts on their own: the GPTQ kernel against RTN, calibration files (token ids
and text through the checkpoint's own tokenizer), user mistakes in one line, and experts that
too few tokens reach falling back to RTN, listed in the summary."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from fixtures import load_tensors
from typer.testing import CliRunner

from moeport.calibrate.kernel import gptq_codes
from moeport.calibrate.tokens import load_samples
from moeport.cli.app import app
from moeport.codecs import GptqCodec, PackQuantizedCodec
from moeport.codecs.int_rtn import rtn_codes, rtn_dequantize, rtn_params
from moeport.errors import MoeportError


def weight_and_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 96, generator=g) @ torch.randn(96, 96, generator=g)  # correlated inputs
    return torch.randn(40, 96, generator=g), x


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_uncorrelated_inputs_give_rtn_codes_exactly(bits, act_order) -> None:
    """With a diagonal Hessian no error can be pushed onto other columns: GPTQ is RTN."""
    w, _ = weight_and_inputs(0)
    scale, _ = rtn_params(w, bits, 32, True, torch.bfloat16)
    h = torch.diag(torch.rand(96, generator=torch.Generator().manual_seed(1)) + 0.5)
    assert torch.equal(gptq_codes(w, h, scale, bits, 0.01, act_order), rtn_codes(w, bits, scale, None))


@pytest.mark.parametrize(
    "codec",
    [
        GptqCodec(group_size=128),
        GptqCodec(group_size=32, checkpoint_format="gptq_v2"),
        GptqCodec(group_size=-1),
        PackQuantizedCodec(bits=4, group_size=32),
        PackQuantizedCodec(bits=8, group_size=None),
    ],
    ids=["gptq-v1-g128", "gptq-v2-g32", "gptq-channel", "w4a16-g32", "w8a16-channel"],
)
def test_identity_hessian_gives_the_codecs_own_rtn_bytes(codec) -> None:
    """The codec's scale rule and its parts from codes (`code_scale`, `from_codes`, what the layer
    walk writes): with H = I GPTQ moves no error, so every part equals `encode`'s, including a
    group of zeros (GPTQ storage: the scale of [-1, 1]), an all-positive group (AutoGPTQ's sym rule
    keeps min 0 there) and values a hair below a half step (round(x/s) + 8, not round(x/s + 8))."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(48, 256, generator=g)
    w[1, :128] = 0
    w[2, :128] = w[2, :128].abs()
    step = 2**-4  # a group whose scale is exactly `step` (amax 7.5 steps), values a hair below x.5
    halves = (torch.arange(31) % 14 - 6.5) * (1 - 2**-22) * step
    w[3, :32] = torch.cat([torch.tensor([-7.5 * step]), halves])
    scale = codec.code_scale(w)
    codes = gptq_codes(w, torch.eye(256), scale, codec.bits, 0.01)
    ours, rtn = codec.from_codes(codes, scale), codec.encode(w)
    assert sorted(ours) == sorted(rtn)
    for part in rtn:
        assert rtn[part].dtype == ours[part].dtype and torch.equal(ours[part], rtn[part]), part


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error_with_rtn_scales(act_order) -> None:
    w, x = weight_and_inputs(2)
    scale, _ = rtn_params(w, 4, 32, True, torch.bfloat16)
    h = 2 * x.T @ x / x.shape[0]
    ours = rtn_dequantize(gptq_codes(w, h, scale, 4, 0.01, act_order), scale, None)
    rtn = rtn_dequantize(rtn_codes(w, 4, scale, None), scale, None)
    err_gptq, err_rtn = float(((w - ours) @ x.T).norm()), float(((w - rtn) @ x.T).norm())
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)
    assert gptq_codes(w, -h, scale, 4, 0.01) is None  # not positive definite: the caller uses RTN


def test_token_id_files_agree_and_short_rows_are_packed(tmp_path) -> None:
    ids = torch.randint(0, 100, (6, 40), generator=torch.Generator().manual_seed(3))
    (tmp_path / "a.json").write_text(json.dumps(ids.tolist()))
    np.save(tmp_path / "a.npy", ids.numpy())
    torch.save(ids, tmp_path / "a.pt")
    got = [load_samples(tmp_path / f"a.{s}", tmp_path, 4, 32, 128) for s in ("json", "npy", "pt")]
    assert all(torch.equal(g, ids[:4, :32]) for g in got)
    packed = load_samples(tmp_path / "a.json", tmp_path, 100, 48, 128)  # rows of 40 < 48: one stream
    assert torch.equal(packed, ids.flatten()[:240].reshape(5, 48))


def test_text_is_tokenised_with_the_checkpoints_tokenizer(checkpoint, tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = "the cat sat on a mat and then ran off to see dog".split()
    src = tmp_path / "src"
    shutil.copytree(checkpoint("qwen3_moe", "hub", "bf16"), src)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(src)
    lines = ["the cat sat on a mat and then ran off", "to see a dog and the cat"]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in lines))
    rows = [AutoTokenizer.from_pretrained(src)(line)["input_ids"] for line in lines]  # 10 and 7 ids
    stream = torch.tensor([t for r in rows for t in r])
    for name in ("c.txt", "c.jsonl"):
        cut = load_samples(tmp_path / name, src, 10, 4, 128)  # every row long enough: each cut
        assert torch.equal(cut, torch.tensor([r[:4] for r in rows])), name
        packed = load_samples(tmp_path / name, src, 10, 8, 128)  # the 7-id row is short: one stream
        assert torch.equal(packed, stream[:16].reshape(2, 8)), name
    with pytest.raises(MoeportError, match="checkpoint's tokenizer"):
        load_samples(tmp_path / "c.txt", checkpoint("qwen3_moe", "hub", "bf16"), 10, 4, 128)


def convert(*args: str):
    return CliRunner().invoke(app, ["convert", *map(str, args), "--quiet", "--json", "--device", "cpu"])


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--to", "w4a16", "--method", "gptq"), "--method gptq needs --calibration FILE"),
        (("--to", "w4a16", "--calibration", "{ids}"), "--calibration: only with --method gptq"),
        (("--to", "w4a16", "--no-spill-states"), "--spill-states: only with --method gptq"),
        (("--to", "w4a16", "--method", "gptq", "--calibration", "{bad}"), "outside the vocabulary (0..127)"),
        (("--to", "w4a16", "--method", "gptq", "--calibration", "{txt}"), "give token ids instead"),
        (("--to", "w4a16", "--method", "gptq", "--calibration", "{csv}"), "unknown kind"),
        (("--to", "w4a16", "--method", "fancy"), "--method fancy: expected one of rtn, gptq"),
        (("--to", "fp8", "--samples", "8"), "--samples, --seq-len: not options of --to fp8"),
    ],
)
def test_calibration_mistakes_are_one_line(checkpoint, tmp_path, args, says) -> None:
    files = {"ids": tmp_path / "ids.json", "bad": tmp_path / "bad.json", "txt": tmp_path / "t.txt"}
    files["csv"] = tmp_path / "ids.csv"
    files["ids"].write_text(json.dumps([[1, 2, 3, 4]]))
    files["bad"].write_text(json.dumps([[300, 2, 3, 4]]))
    files["txt"].write_text("some text\n")
    files["csv"].write_text("1,2,3\n")
    filled = [a.format(**files) for a in args]
    result = convert(
        checkpoint("qwen3_moe", "hub", "bf16"),
        tmp_path / "out",
        *filled,
        "--seq-len",
        "2",
        "--group-size",
        "32",
    )
    assert isinstance(result.exception, MoeportError), result.output
    assert says in str(result.exception) and "\n" not in str(result.exception), str(result.exception)
    assert not (tmp_path / "out").exists()


def test_a_decoder_whose_layers_transformers_keeps_elsewhere_is_refused(tmp_path) -> None:
    """DBRX's `n_layers` blocks live under transformers' `transformer.blocks`, not a `layers`
    list: refused in one line before any work, not quantized with RTN under GPTQ's name."""
    from test_zoo_derived import _save_tiny

    src = _save_tiny("dbrx", tmp_path / "dbrx", hidden=64, inter=64)
    (tmp_path / "ids.json").write_text(json.dumps([[5, 9, 17, 33]]))
    result = convert(src, tmp_path / "out", "--to", "w4a16", "--method", "gptq", "--calibration",
                     tmp_path / "ids.json", "--seq-len", "2", "--group-size", "32")  # fmt: skip
    assert isinstance(result.exception, MoeportError), result.output
    says = str(result.exception)
    assert "DbrxModel holds no list of the 2 decoder layers" in says and "\n" not in says, says
    assert not (tmp_path / "out").exists()


def test_experts_short_of_tokens_fall_back_to_rtn_and_are_listed(checkpoint, tmp_path) -> None:
    src = checkpoint("qwen3_moe", "hub", "bf16")
    (tmp_path / "ids.json").write_text(json.dumps([[5, 9, 17, 33, 65, 2]]))  # 6 tokens, top-2 of 4
    w4 = ("--to", "w4a16", "--group-size", "32")
    assert convert(src, tmp_path / "rtn", *w4).exit_code == 0
    done = convert(src, tmp_path / "gptq", *w4, "--method", "gptq", "--calibration", tmp_path / "ids.json",
                   "--samples", "1", "--seq-len", "6")  # fmt: skip
    assert done.exit_code == 0, done.output
    notes = [n for n in json.loads(done.stdout)["notes"] if "fell back to RTN" in n]
    assert len(notes) == 3, notes  # every layer: no expert sees 16 tokens
    listed = [w for n in notes for w in re.findall(r"model\.layers\.[\w.]+\.weight", n)]
    assert len(listed) == 36  # 3 layers x 4 experts x (gate, up, down)
    ours, rtn = load_tensors(tmp_path / "gptq"), load_tensors(tmp_path / "rtn")
    for name in listed:
        packed = name.removesuffix("weight") + "weight_packed"
        assert torch.equal(ours[packed], rtn[packed]), packed


def test_experts_calibrated_in_chunks_give_the_same_bytes(checkpoint, tmp_path, monkeypatch) -> None:
    """A Hessian budget of one expert at a time (a pass over the states per expert) changes
    nothing: an expert's inputs do not depend on the other experts."""
    from moeport.calibrate import sequential

    src = checkpoint("deepseek_v3", "hub", "bf16")
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(4))
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    args = ("--to", "w4a16", "--group-size", "32", "--method", "gptq", "--calibration", tmp_path / "ids.json")
    args += ("--samples", "8", "--seq-len", "16")
    assert convert(src, tmp_path / "whole", *args).exit_code == 0
    monkeypatch.setattr(sequential, "HESSIAN_BYTES", 1)
    assert convert(src, tmp_path / "chunked", *args).exit_code == 0
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole").glob("*.safetensors")}
    assert whole == {p.name: p.read_bytes() for p in (tmp_path / "chunked").glob("*.safetensors")}


def test_states_files_round_trip_in_chunks_and_other_runs_files_are_not_used(tmp_path) -> None:
    """A boundary file read whole or a chunk of samples at a time gives the states written; a file
    of another shape (another run's, or cut short by a crash) is not taken as this run's."""
    from moeport.calibrate import states as st

    x = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(4))
    st.save(x, tmp_path / "gptq-states" / "layer-00002.f32")
    path = tmp_path / "gptq-states" / "layer-00002.f32"
    assert not path.with_suffix(".tmp").exists()
    whole, spilled = st.load(path, (5, 3, 8), "cpu", False), st.load(path, (5, 3, 8), "cpu", True)
    assert torch.equal(torch.cat(list(whole.chunks(2))), x)
    assert [c.shape[0] for c in spilled.chunks(2)] == [2, 2, 1]
    assert torch.equal(torch.cat(list(spilled.chunks(2))), x)
    assert st.load(path, (6, 3, 8), "cpu", True) is None
    writer = st.StatesWriter((5, 3, 8), "cpu", tmp_path / "gptq-states" / "layer-00003.f32")
    writer.write(0, x[:2])
    writer.abandon()  # an error mid-layer: no boundary file, no temporary left
    assert sorted(p.name for p in (tmp_path / "gptq-states").iterdir()) == ["layer-00002.f32"]
