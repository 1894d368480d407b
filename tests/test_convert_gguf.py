"""`--to gguf` and GGUF sources, checked by gguf-py (reader, name map, quantizers) and kt-kernel.

Sources are tiny models written by transformers' own classes; what the GGUF must hold is stated
from gguf-py's name table, llama.cpp's q/k permutation formula and `gguf.quants.quantize`
(gguf_support.py). The GGUF read back by moeport (`--to hf`) must give the GGUF's own values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import build_transformers_checkpoint, load_tensors
from gguf_support import dequantized, expected_gguf, read_gguf

FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    cache: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in cache:
            root = tmp_path_factory.mktemp(model_type)
            cache[model_type] = build_transformers_checkpoint(model_type, "hub", root / "src", seed=5)
        return cache[model_type]

    return make


def _config(src: Path) -> dict:
    return json.loads((src / "config.json").read_text())


def _f32(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 1 or "ffn_gate_inp" in name


@pytest.mark.parametrize(
    ("model_type", "gguf_type"),
    [
        ("qwen3_moe", "bf16"),
        ("qwen3_moe", "q8_0"),
        ("qwen3_moe", "q4_0"),
        ("mixtral", "f16"),
        ("mixtral", "mxfp4"),
        ("deepseek_v3", "bf16"),
        ("deepseek_v3", "q8_0"),
    ],
)
def test_gguf_holds_what_llama_cpp_converter_would(main, sources, tmp_path, model_type, gguf_type):
    import gguf

    src = sources(model_type)
    code, _, err = main("convert", src, tmp_path / "g", "--to", "gguf", "--gguf-type", gguf_type, "--quiet")
    assert code == 0, err
    want = expected_gguf(load_tensors(src), model_type, _config(src))
    got = read_gguf(tmp_path / "g" / "model.gguf")
    assert set(got) == set(want)
    for name, w in want.items():
        kind, data = got[name]
        stacked = "_exps" in name
        if _f32(name, tuple(w.shape[stacked:])):
            expected_kind = "F32"
        elif gguf_type == "mxfp4":
            expected_kind = "MXFP4" if stacked else "Q8_0"
        else:
            expected_kind = gguf_type.upper()
        if expected_kind not in ("F32", "F16", "BF16") and w.shape[-1] % 32:
            expected_kind = "F16"  # llama.cpp's converter: rows not whole blocks fall back to F16
        assert kind == expected_kind, name
        if kind in ("F32", "F16", "BF16"):
            assert torch.equal(dequantized(kind, data), w.to(FLOATS[kind]).float()), name
        else:  # bytes as gguf-py's quantizer makes them from the same weights
            ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[kind])
            assert np.array_equal(data, ref), name


def test_gguf_values_round_trip_exactly_through_moeport(main, sources, tmp_path):
    src = sources("qwen3_moe")
    config = _config(src)
    assert main("convert", src, tmp_path / "bf16", "--to", "gguf", "--quiet")[0] == 0
    assert main("convert", tmp_path / "bf16", tmp_path / "back", "--to", "hf", "--quiet")[0] == 0
    source, back = load_tensors(src), load_tensors(tmp_path / "back")
    assert set(back) == set(source)
    for name, t in source.items():  # bf16 stays bf16; norms come back as the F32 llama.cpp keeps
        assert torch.equal(back[name].float(), t.float()), name
    back_config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back_config["model_type"] == "qwen3_moe"
    # q8_0: moeport's GGUF source decodes exactly what gguf-py decodes from the file
    assert main("convert", src, tmp_path / "q8", "--to", "gguf", "--gguf-type", "q8_0", "--quiet")[0] == 0
    code, _, err = main(
        "convert",
        tmp_path / "q8" / "model.gguf",
        tmp_path / "q8-hf",
        "--to",
        "hf",
        "--dtype",
        "fp32",
        "--quiet",
    )
    assert code == 0, err
    decoded = expected_gguf(load_tensors(tmp_path / "q8-hf"), "qwen3_moe", config)
    for name, (kind, data) in read_gguf(tmp_path / "q8" / "model.gguf").items():
        assert torch.equal(decoded[name], dequantized(kind, data)), name


@pytest.mark.parametrize("gguf_type", ["bf16", "q8_0"])
def test_deepseek_mla_kv_b_comes_back_whole(main, sources, tmp_path, gguf_type):
    """llama.cpp stores kv_b_proj as k_b (transposed) and v_b: the GGUF source joins them again."""
    src = sources("deepseek_v3")
    assert main("convert", src, tmp_path / "g", "--to", "gguf", "--gguf-type", gguf_type, "--quiet")[0] == 0
    assert (
        main("convert", tmp_path / "g", tmp_path / "back", "--to", "hf", "--dtype", "fp32", "--quiet")[0] == 0
    )
    config = _config(src)
    back = load_tensors(tmp_path / "back")
    decoded = expected_gguf(back, "deepseek_v3", config)
    for name, (kind, data) in read_gguf(tmp_path / "g" / "model.gguf").items():
        assert torch.equal(decoded[name], dequantized(kind, data)), name
    if gguf_type == "bf16":
        source = load_tensors(src)
        assert all(torch.equal(back[k], source[k].float()) for k in source)
    back_config = json.loads((tmp_path / "back" / "config.json").read_text())
    for field in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        assert back_config[field] == config[field], field


def test_llama_arch_q_k_permutation_is_undone_on_read(main, sources, tmp_path):
    src = sources("mixtral")
    assert main("convert", src, tmp_path / "g", "--to", "gguf", "--quiet")[0] == 0
    assert main("convert", tmp_path / "g", tmp_path / "back", "--to", "hf", "--quiet")[0] == 0
    source, back = load_tensors(src), load_tensors(tmp_path / "back")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight"):
        assert torch.equal(back[name], source[name]), name
    code, out, _ = main("verify", src, tmp_path / "g", "--quiet")
    assert code == 0, out


def test_split_files_resume_and_read_back_as_one(main, sources, tmp_path, monkeypatch):
    from gguf import GGUFReader

    from moeport.sinks import gguf as sink

    src = sources("qwen3_moe")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main("convert", src, whole, "--to", "gguf", "--quiet")[0] == 0
    real_close = sink.GgufFileWriter.close
    calls = []

    def failing_close(self):  # the disk fills up as the second file is finished
        calls.append(self.path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(self.partial))
        return real_close(self)

    monkeypatch.setattr(sink.GgufFileWriter, "close", failing_close)
    code, _, err = main("convert", src, split, "--to", "gguf", "--max-shard-size", "100KB", "--quiet")
    assert code != 0 and "No space left" in err
    monkeypatch.setattr(sink.GgufFileWriter, "close", real_close)
    code, out, err = main("convert", src, split, "--to", "gguf", "--max-shard-size", "100KB", "--json")
    assert code == 0, err
    files = sorted(split.glob("*.gguf"))
    assert 1 <= json.loads(out)["pieces_kept"] < len(files)  # the files finished before the failure
    assert len(files) >= 3 and files[0].name == f"model-00001-of-{len(files):05d}.gguf"
    for i, f in enumerate(files):
        fields = GGUFReader(f).fields
        assert fields["split.no"].contents() == i and fields["split.count"].contents() == len(files)
        assert ("qwen3moe.block_count" in fields) == (i == 0)
    assert read_gguf(split).keys() == read_gguf(whole).keys()
    for name, (kind, data) in read_gguf(whole).items():
        assert np.array_equal(read_gguf(split)[name][1], data) and read_gguf(split)[name][0] == kind
    assert main("convert", files[1], tmp_path / "hf", "--to", "hf", "--quiet")[0] == 0
    assert set(load_tensors(tmp_path / "hf")) == set(load_tensors(src))


def test_bad_gguf_input_is_one_line(main, sources, tmp_path):
    from gguf import GGUFWriter

    src = sources("qwen3_moe")
    assert main("convert", src, tmp_path / "g", "--to", "gguf", "--quiet")[0] == 0
    data = (tmp_path / "g" / "model.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "head.gguf").write_bytes(data[:200])
    w = GGUFWriter(tmp_path / "bert.gguf", "bert")
    w.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for bad, message in (("cut.gguf", "GGUF"), ("head.gguf", "GGUF"), ("bert.gguf", "architecture 'bert'")):
        code, _, err = main("convert", tmp_path / bad, tmp_path / "out", "--to", "hf", "--quiet")
        assert code == 2 and message in err and "Traceback" not in err, (bad, err)
        assert len(err.strip().splitlines()) == 1, err
    code, _, err = main("convert", src, tmp_path / "x", "--to", "gguf", "--gguf-type", "q4_k", "--quiet")
    assert code == 2 and "--gguf-type q4_k" in err


def test_kt_kernel_llamafile_runs_our_gguf(monkeypatch, tmp_path, main):
    from kt_support import import_kt, kt_wrapper
    from test_convert_kt import I_SIZE, TOPK, E, H, _build, _torch_moe

    _, experts_base = import_kt()
    src = _build("qwen3_moe", tmp_path / "src", None)  # fused experts, H = I = 256
    assert main("convert", src, tmp_path / "g", "--to", "gguf", "--gguf-type", "q8_0", "--quiet")[0] == 0
    layer = 1
    stored = read_gguf(tmp_path / "g")
    gate, up, down = (
        dequantized(*stored[f"blk.{layer}.ffn_{p}_exps.weight"]) for p in ("gate", "up", "down")
    )
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(8)])
    weights = torch.rand(8, TOPK, generator=g)
    monkeypatch.setenv("KT_FORCE_SYNC_SUBMIT", "1")
    monkeypatch.setattr(experts_base.KExpertsCPUBuffer, "temp_bs", 0)
    wrapper = kt_wrapper(
        monkeypatch, tmp_path / "g", layer, E, TOPK, H, I_SIZE, "LLAMAFILE", 1, cpu_save=False
    )
    wrapper.load_weights(torch.arange(E, dtype=torch.int64))
    got = wrapper.forward(x, ids, weights, 0).float().clone()
    del wrapper
    want = _torch_moe(x, ids, weights, [(gate[e], up[e], down[e]) for e in range(E)])
    err = float((got - want).norm() / want.norm())
    assert err < 0.03, f"LLAMAFILE on our Q8_0 GGUF: relative error {err:.4f}"


def test_a_gguf_mixing_types_written_by_gguf_py_decodes_exactly(main, sources, tmp_path):
    """A file like llama-quantize's mixes (Q4_K_M keeps some tensors in other types), written by
    gguf-py's own GGUFWriter from our bf16 output: each tensor decodes as gguf-py decodes it."""
    import gguf

    src = sources("qwen3_moe")
    assert main("convert", src, tmp_path / "g", "--to", "gguf", "--quiet")[0] == 0
    reader = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    (tmp_path / "m").mkdir()
    writer = gguf.GGUFWriter(tmp_path / "m" / "mixed.gguf", "qwen3moe")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    kinds = ["Q4_0", "Q5_1", "Q8_0", "Q4_1"]
    for i, t in enumerate(reader.tensors):
        values = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        if t.tensor_type.name == "F32":
            writer.add_tensor(t.name, values.astype(np.float32))
            continue
        kind = gguf.GGMLQuantizationType[kinds[i % len(kinds)]]
        writer.add_tensor(t.name, gguf.quants.quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, _, err = main(
        "convert", tmp_path / "m" / "mixed.gguf", tmp_path / "hf", "--to", "hf", "--dtype", "fp32", "--quiet"
    )
    assert code == 0, err
    decoded = expected_gguf(load_tensors(tmp_path / "hf"), "qwen3_moe", _config(src))
    stored = read_gguf(tmp_path / "m" / "mixed.gguf")
    assert {kind for kind, _ in stored.values()} == {"F32", *kinds}
    for name, (kind, data) in stored.items():
        assert torch.equal(decoded[name], dequantized(kind, data)), name


def test_tokenizer_goes_into_the_gguf_as_gguf_py_reads_it(main, sources, tmp_path):
    """A byte-level BPE tokenizer (trained here by the `tokenizers` library, saved as
    transformers saves it) is written with gguf-py's vocab readers: tokens in id order, merges,
    special ids, the arch's pre-tokenizer name."""
    import shutil

    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    src = tmp_path / "src"
    shutil.copytree(sources("qwen3_moe"), src)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(src)
    assert main("convert", src, tmp_path / "g", "--to", "gguf", "--quiet")[0] == 0
    fields = GGUFReader(tmp_path / "g" / "model.gguf").fields
    vocab = json.loads((src / "tokenizer.json").read_text())["model"]
    by_id = sorted(vocab["vocab"], key=vocab["vocab"].get)
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert fields["tokenizer.ggml.tokens"].contents() == by_id
    merges = [m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]]
    assert fields["tokenizer.ggml.merges"].contents() == merges
    assert fields["tokenizer.ggml.eos_token_id"].contents() == vocab["vocab"]["<|endoftext|>"]
