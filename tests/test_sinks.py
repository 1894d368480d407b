"""Streaming sharded writer: read back bit-exactly by safetensors, atomic, index last."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import load_tensors
from safetensors import safe_open
from test_sources import random_tensors, same_bits

from moeport.sinks import ShardedWriter, TensorSpec, save_sharded
from moeport.sources import open_checkpoint


def test_sharded_output_reads_back_bit_exactly_with_the_hf_index(tmp_path) -> None:
    tensors = random_tensors()
    files = save_sharded(tmp_path, tensors, max_shard_bytes=1200, metadata={"source": "test"})
    assert len(files) > 2 and all(f.exists() for f in files)
    assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"

    back = load_tensors(tmp_path)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert same_bits(back[name], t), name

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    ck = open_checkpoint(tmp_path)  # our own reader validates the index against the headers
    assert all(ck.info(k).file.name == index["weight_map"][k] for k in tensors)
    with safe_open(str(files[0]), "pt") as h:
        assert h.metadata() == {"format": "pt", "source": "test"}
    assert not list(tmp_path.glob("*.partial"))


def test_tensors_may_arrive_in_any_order_and_shards_publish_when_full(tmp_path) -> None:
    tensors = random_tensors(3)
    specs = [TensorSpec.of(k, v) for k, v in tensors.items()]
    writer = ShardedWriter(tmp_path, specs, max_shard_bytes=600)
    names = list(tensors)
    for name in reversed(names):
        writer.write(name, tensors[name])
    writer.drain()  # writes run on a background thread
    last_shard = writer.files[-1]
    assert last_shard.exists()  # complete shards are renamed into place before close
    assert not (tmp_path / "model.safetensors.index.json").exists()  # ...but the index only on close
    writer.close()
    back = load_tensors(tmp_path)
    assert all(same_bits(back[k], v) for k, v in tensors.items())


def test_single_shard_has_no_index_and_empty_or_scalar_tensors_work(tmp_path) -> None:
    tensors = {"empty": torch.empty(0, 4), "scalar": torch.tensor(2.5), "x": torch.randn(3, 3)}
    files = save_sharded(tmp_path, tensors)
    assert [f.name for f in files] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    back = load_tensors(tmp_path)
    assert (
        back["empty"].shape == (0, 4)
        and back["scalar"].item() == 2.5
        and torch.equal(back["x"], tensors["x"])
    )


def test_failure_leaves_no_published_output(tmp_path) -> None:
    tensors = random_tensors()
    specs = [TensorSpec.of(k, v) for k, v in tensors.items()]
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedWriter(tmp_path, specs, max_shard_bytes=10**9) as writer:
            writer.write("bf16", tensors["bf16"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_shape_or_dtype_other_than_planned_is_refused(tmp_path) -> None:
    writer = ShardedWriter(tmp_path, [TensorSpec("w", "BF16", (2, 3))])
    with pytest.raises(ValueError, match="planned BF16"):
        writer.write("w", torch.randn(3, 2).bfloat16())
    with pytest.raises(ValueError, match="not in the output plan"):
        writer.write("other", torch.randn(2, 3).bfloat16())
    with pytest.raises(ValueError, match="never written"):
        writer.close()
    writer.abort()
    assert not list(tmp_path.iterdir())


def test_a_failure_mid_write_leaves_no_partial_files(tmp_path) -> None:
    """An error while shards are still being written (some full and queued to close, one open)
    leaves no `.partial` file and no index."""
    tensors = random_tensors(6)
    specs = [TensorSpec.of(k, v) for k, v in tensors.items()]
    names = list(tensors)
    with pytest.raises(RuntimeError, match="stop"):
        with ShardedWriter(tmp_path, specs, max_shard_bytes=600) as writer:
            for name in names[:-1]:
                writer.write(name, tensors[name])
            raise RuntimeError("stop")
    assert not list(tmp_path.glob("*.partial"))
    assert not (tmp_path / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("order", ["planned", "reversed"])
def test_tensors_larger_than_a_writeback_chunk_are_written_whole(tmp_path, monkeypatch, order) -> None:
    """The writer cuts each tensor into writeback chunks (sinks.safetensors_file.WRITEBACK_EVERY,
    32 MiB; a few hundred bytes here) and starts the disk's writeback per chunk range, in plan
    order or not; the file reads back bit-exact through safetensors and its checksum is the file's."""
    from moeport.sinks import safetensors_file

    monkeypatch.setattr(safetensors_file, "WRITEBACK_EVERY", 300)
    g = torch.Generator().manual_seed(11)
    tensors = {f"w{i}": torch.randn(17 + 9 * i, 13, generator=g) for i in range(4)}
    specs = [TensorSpec.of(k, v) for k, v in tensors.items()]
    writer = safetensors_file.SafetensorsFileWriter(tmp_path / "x.safetensors", specs)
    for name in tensors if order == "planned" else reversed(list(tensors)):
        writer.write(name, tensors[name])
    record = writer.close()
    path = tmp_path / "x.safetensors"
    assert record["size"] == path.stat().st_size
    assert record[safetensors_file.CHECKSUM] == safetensors_file.file_checksum(path)
    with safe_open(str(path), "pt") as f:
        assert all(same_bits(f.get_tensor(k), v) for k, v in tensors.items())
