"""A Hub repo id (`org/name`) where a checkpoint folder is expected: its snapshot in the local
Hugging Face cache, found offline with huggingface_hub's own lookup (moeport never downloads)."""

from __future__ import annotations

import re
from pathlib import Path

from moeport.errors import MoeportError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_source(path: Path) -> Path:
    """`path` itself when it exists or cannot be a repo id (`org/` is a local folder: a mistyped
    local path, which open_checkpoint reports); else the cached snapshot of the repo."""
    if path.exists() or not REPO_ID.fullmatch(str(path)) or path.parent.exists():
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise MoeportError(
            f"{path}: no such file or folder; to read it as a Hub repo from the local Hugging Face "
            "cache, pip install huggingface_hub"
        ) from None
    try:
        return Path(snapshot_download(str(path), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        raise MoeportError(
            f"{path}: no such file or folder, nor a repo in the local Hugging Face cache (to fetch the "
            f"Hub repo: hf download {path})"
        ) from None
