"""Checkpoint reading: every dtype bit-exact, sharded folders, single files, lazy handles."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from moeport.errors import MoeportError
from moeport.sources import open_checkpoint


def random_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(7, 33, generator=g) * 3
    return {
        "bf16": f.to(torch.bfloat16),
        "f16": f.to(torch.float16),
        "f32": f,
        "fp8_e4m3": f.to(torch.float8_e4m3fn),
        "fp8_e5m2": f.to(torch.float8_e5m2),
        "e8m0": torch.randint(100, 140, (7, 2), generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu),
        "u8": torch.randint(0, 256, (5, 16), generator=g, dtype=torch.uint8),
        "i8": torch.randint(-128, 128, (5, 16), generator=g, dtype=torch.int8),
        "i32": torch.randint(-(2**31), 2**31 - 1, (4, 9), generator=g, dtype=torch.int32),
        "i64": torch.randint(0, 1000, (2,), generator=g, dtype=torch.int64),
        "scalar": torch.randn((), generator=g),
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_reads_every_dtype_bit_exactly_from_a_sharded_folder(tmp_path) -> None:
    tensors = random_tensors()
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    ck = open_checkpoint(tmp_path)
    assert sorted(ck.keys()) == sorted(names)
    assert ck.config is None
    for name, t in tensors.items():
        info = ck.info(name)
        assert info.shape == tuple(t.shape)
        assert info.file.name == weight_map[name]
        assert info.nbytes == t.numel() * t.element_size()
        assert same_bits(ck.read(name), t), name
    assert {i.dtype for i in map(ck.info, names)} >= {
        "F8_E4M3",
        "F8_E5M2",
        "F8_E8M0",
        "U8",
        "I8",
        "I32",
        "BF16",
    }
    ck.release()
    assert same_bits(ck.read("bf16"), tensors["bf16"])  # reopens lazily after release


def test_single_file_and_folder_without_index(tmp_path) -> None:
    tensors = random_tensors(1)
    save_file(tensors, str(tmp_path / "weights.safetensors"))
    for path in (tmp_path, tmp_path / "weights.safetensors"):
        ck = open_checkpoint(path)
        assert sorted(ck.keys()) == sorted(tensors)
        assert same_bits(ck.read("fp8_e4m3"), tensors["fp8_e4m3"])
    assert ck.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_unknown_tensor_name_is_a_clear_error(tmp_path) -> None:
    save_file(random_tensors(), str(tmp_path / "model.safetensors"))
    with pytest.raises(MoeportError, match="no tensor named 'missing'"):
        open_checkpoint(tmp_path).info("missing")


def test_tensor_stored_twice_is_refused(tmp_path) -> None:
    t = random_tensors()
    save_file({"bf16": t["bf16"]}, str(tmp_path / "a.safetensors"))
    save_file({"bf16": t["f16"]}, str(tmp_path / "b.safetensors"))
    with pytest.raises(MoeportError, match="also stored in"):
        open_checkpoint(tmp_path)


def test_index_pointing_to_the_wrong_shard_is_refused(tmp_path) -> None:
    t = random_tensors()
    save_file({"bf16": t["bf16"]}, str(tmp_path / "a.safetensors"))
    save_file({"f16": t["f16"]}, str(tmp_path / "b.safetensors"))
    index = {"weight_map": {"bf16": "b.safetensors", "f16": "b.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MoeportError, match="maps tensor 'bf16' to b.safetensors but it is in no shard"):
        open_checkpoint(tmp_path)


def test_hole_in_the_data_buffer_is_detected(tmp_path) -> None:
    """A header whose tensors leave a gap is corrupt (the reference reader rejects it too)."""
    path = tmp_path / "model.safetensors"
    header = json.dumps({"a": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes([7, 8, 9]))
    with pytest.raises(MoeportError, match="gap or overlap"):
        open_checkpoint(path)
