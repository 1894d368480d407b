"""Seeded fuzzing of what a user hands moeport: safetensors headers, the index and config.json of a
tiny checkpoint are mutated at random; every run must end in exit 0 with an output equal to its
source (a plain hub -> hub copy) or in exit 2 with one line and nothing at DST. Never a traceback,
never a hang."""

from __future__ import annotations

import json
import random
import shutil
import signal
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeport.convert.destination import staging_of

CASES = 240
SEED = 20261202


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header_text: str, data: bytes, length_delta: int = 0) -> bytes:
    body = header_text.encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body) + length_delta) + body + data


ODD_VALUES = ["8", -1, 0, 3.5, None, [], {}, 10**12, True, "", [1, 2]]


def mutate(rng: random.Random, src: Path, dst: Path) -> str:
    """Copy `src` to `dst` with one random defect; returns what was done (for failure messages)."""
    shutil.copytree(src, dst)
    shard, cfg_path = dst / "model.safetensors", dst / "config.json"
    header, data = _split(shard)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    kind = rng.randrange(9)
    if kind == 0:
        header[name]["shape"] = rng.choice([[], [-1], [1.5], "x", [0], None, [*header[name]["shape"], 1]])
    elif kind == 1:
        header[name]["dtype"] = rng.choice(["BF16", "F32", "I8", "F8_E4M3", "U8", "XYZ", 5, None])
    elif kind == 2:
        begin, end = header[name]["data_offsets"]
        shift = rng.choice([-1, 1, 8, -8])
        header[name]["data_offsets"] = rng.choice(
            [[begin + shift, end + shift], [end, begin], [-1, end], [begin, 1.5], "a", [begin]]
        )
    elif kind == 3:
        del header[name]
    elif kind == 4:
        header["__metadata__"] = rng.choice([1, {"a": 1}, "x", {"format": "pt"}, {"k": "v"}])
    elif kind == 5:  # the header length prefix or the file's length
        text = json.dumps(header, separators=(",", ":"))
        blob = _join(text, data, rng.choice([-3, 5, 10**9]))
        cut = rng.choice([len(blob), len(blob) - 7, 3])
        shard.write_bytes(blob[:cut])
        return f"header length/truncation on {shard.name}"
    elif kind == 6:  # a duplicated key
        text = json.dumps(header, separators=(",", ":"))
        shard.write_bytes(_join(text[:-1] + f',"{name}":{json.dumps(header[name])}' + "}", data))
        return f"duplicate {name}"
    elif kind == 7:  # config.json
        cfg = json.loads(cfg_path.read_text())
        key = rng.choice(sorted(cfg))
        if rng.random() < 0.3:
            del cfg[key]
        else:
            cfg[key] = rng.choice(ODD_VALUES)
        cfg_path.write_text(json.dumps(cfg))
        return f"config {key}"
    else:  # an index
        weight_map = dict.fromkeys(names, "model.safetensors")
        change = rng.randrange(4)
        if change == 0:
            weight_map[name] = rng.choice(
                [7, None, "../x.safetensors", "/abs.safetensors", "gone.safetensors"]
            )
        elif change == 1:
            del weight_map[name]
        elif change == 2:
            weight_map = list(weight_map)  # type: ignore[assignment]
        index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
        return f"index change {change} on {name}"
    shard.write_bytes(_join(json.dumps(header, separators=(",", ":")), data))
    return f"header kind {kind} on {name}"


class Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise Hang


def test_fuzzed_inputs_end_verified_or_refused_in_one_line(tiny, tmp_path, monkeypatch, capsys):
    from moeport.cli.app import main
    from moeport.sources import open_checkpoint

    rng = random.Random(SEED)
    outcomes = {0: 0, 2: 0}
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for i in range(CASES):
            src, dst = tmp_path / f"src{i}", tmp_path / f"out{i}"
            what = mutate(rng, tiny, src)
            monkeypatch.setattr(
                sys, "argv", ["moeport", "convert", str(src), str(dst), "--quiet", "--device", "cpu"]
            )
            signal.alarm(60)
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code
            except Hang:
                pytest.fail(f"case {i} ({what}): no answer within 60 s")
            finally:
                signal.alarm(0)
            err = capsys.readouterr().err
            assert code in (0, 2), f"case {i} ({what}): exit {code}: {err}"
            outcomes[code] += 1
            if code == 2:
                lines = err.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("error:"), f"case {i} ({what}): {err}"
                assert not dst.exists() and not staging_of(dst).exists(), f"case {i} ({what})"
            else:  # a hub -> hub copy: every tensor as the source stores it
                out = load_file(str(dst / "model.safetensors"))
                with open_checkpoint(src) as ck:
                    assert sorted(out) == sorted(ck.keys()), f"case {i} ({what})"
                    for key, tensor in out.items():
                        assert torch.equal(tensor.view(torch.uint8), ck.read(key).view(torch.uint8)), key
            shutil.rmtree(src)
            shutil.rmtree(dst, ignore_errors=True)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes[0] > 10 and outcomes[2] > 100, outcomes  # both kinds of ending were exercised
