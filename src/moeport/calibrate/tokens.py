"""Calibration samples: token ids [samples, seq_len] from a local file, never the network.

Token ids (.json list of lists, .pt tensor or list, .npy array) serve checkpoints without a
tokenizer; text (.txt: one document per line, .jsonl: a "text" field or "input_ids" per record)
is tokenised with the checkpoint's own tokenizer. Rows at least seq_len long are cut to it;
otherwise every row is joined into one stream and cut into seq_len pieces.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from moeport.errors import MoeportError

ID_SUFFIXES = (".json", ".pt", ".npy")
TEXT_SUFFIXES = (".txt", ".jsonl")


def file_digest(path: Path) -> str:
    """sha256 of the calibration file: part of the recipe, so a changed file is a new job."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


def load_samples(path: Path, root: Path, samples: int, seq_len: int, vocab: int) -> torch.Tensor:
    """int64 [n <= samples, seq_len] calibration ids (MoeportError naming the file when unusable)."""
    if not path.is_file():
        raise MoeportError(f"--calibration {path}: no such file")
    rows = _rows(path, root)
    rows = [r for r in rows if r]
    if not rows:
        raise MoeportError(f"--calibration {path}: holds no tokens")
    if all(len(r) >= seq_len for r in rows[:samples]):
        cut = [r[:seq_len] for r in rows[:samples]]
    else:
        stream = [t for r in rows for t in r]
        cut = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)][:samples]
    if not cut:
        raise MoeportError(
            f"--calibration {path}: {sum(map(len, rows))} tokens, fewer than one --seq-len {seq_len} sample"
        )
    ids = torch.tensor(cut, dtype=torch.int64)
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        raise MoeportError(
            f"--calibration {path}: token id {int(ids[bad][0])} outside the vocabulary (0..{vocab - 1})"
        )
    return ids


def _rows(path: Path, root: Path) -> list[list[int]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            return _id_rows(json.loads(path.read_text(encoding="utf-8")), path)
        if suffix == ".pt":
            return _id_rows(torch.load(path, map_location="cpu", weights_only=True), path)
        if suffix == ".npy":
            import numpy as np

            return _id_rows(np.load(path, allow_pickle=False).tolist(), path)
        if suffix in TEXT_SUFFIXES:
            return _text_rows(path, root)
    except (OSError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise MoeportError(f"--calibration {path}: unreadable ({exc})") from None
    raise MoeportError(
        f"--calibration {path}: unknown kind; expected token ids ({', '.join(ID_SUFFIXES)}) "
        f"or text ({', '.join(TEXT_SUFFIXES)})"
    )


def _id_rows(data: object, path: Path) -> list[list[int]]:
    if isinstance(data, torch.Tensor):
        data = data.tolist()
    if isinstance(data, list) and data and all(isinstance(t, int) for t in data):
        data = [data]  # one flat list of ids
    ok = isinstance(data, list) and all(
        isinstance(r, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in r) for r in data
    )
    if not ok:
        raise MoeportError(f"--calibration {path}: expected a list of lists of token ids")
    return data  # type: ignore[return-value]


def _text_rows(path: Path, root: Path) -> list[list[int]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    texts: list[str] = []
    rows: list[list[int]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            record = json.loads(line)
            if isinstance(record, dict) and "input_ids" in record:
                rows += _id_rows([record["input_ids"]], path)
            elif isinstance(record, dict) and isinstance(record.get("text"), str):
                texts.append(record["text"])
            else:
                raise MoeportError(f"--calibration {path}: line {n} has neither 'text' nor 'input_ids'")
        else:
            texts.append(line)
    if texts:
        tokenizer = _tokenizer(root, path)
        rows += [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    return rows


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _tokenizer(root: Path, path: Path):
    # transformers builds an empty tokenizer from a folder holding none: look for its files first
    problem = "no tokenizer files" if not any((root / f).is_file() for f in TOKENIZER_FILES) else ""
    if not problem:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(root, local_files_only=True)
        except (OSError, ValueError) as exc:
            problem = str(exc).splitlines()[0]
    raise MoeportError(
        f"--calibration {path}: text needs the checkpoint's tokenizer, which {root} lacks ({problem}); "
        "give token ids instead (.json list of lists, .pt or .npy)"
    )
