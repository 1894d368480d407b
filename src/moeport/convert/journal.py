"""A resumable conversion's journal: the recipe and the steps already finished, in DST.

The journal is a JSON file rewritten atomically (temporary name, fsync, rename) after every step;
a step's files are published (renamed into place) before its journal entry is written, so a
crash at any point leaves either a finished step that the journal knows about, or files that the
next run rewrites. Nothing in it depends on time, so a resumed run ends with the same journal as
an uninterrupted one.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from moeport.errors import MoeportError, OutputWriteError
from moeport.sinks.sharded import write_json_atomic

JOURNAL_VERSION = 1


class Journal:
    """Recipe + finished steps ({step name: record}); `complete` once the output is whole."""

    def __init__(self, path: Path, recipe: dict[str, Any]):
        self.path = path
        self.recipe = recipe
        self.steps: dict[str, dict[str, Any]] = {}
        self.complete = False
        self._lock = threading.Lock()  # pieces are recorded from the writer's closing thread

    @classmethod
    def load(cls, path: Path) -> Journal | None:
        """The journal at `path`, or None when there is none; MoeportError when it is unreadable."""
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("version") != JOURNAL_VERSION:
                raise ValueError(f"version {doc.get('version')}, expected {JOURNAL_VERSION}")
            j = cls(path, doc["recipe"])
            j.steps = dict(doc["steps"])
            j.complete = bool(doc["complete"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MoeportError(f"{path}: unreadable conversion journal ({exc}); use --overwrite") from None
        return j

    def done(self, step: str) -> dict[str, Any] | None:
        return self.steps.get(step)

    def record(self, step: str, info: dict[str, Any]) -> None:
        with self._lock:
            self.steps[step] = info
            self.save()

    def finish(self) -> None:
        self.complete = True
        self.save()

    def save(self) -> None:
        doc = {
            "version": JOURNAL_VERSION,
            "recipe": self.recipe,
            "complete": self.complete,
            "steps": dict(sorted(self.steps.items())),  # the same whatever order pieces finished in
        }
        try:
            write_json_atomic(self.path, doc)
        except OSError as exc:
            raise OutputWriteError(f"{self.path}: cannot write the journal ({exc.strerror})") from None


def recipe_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'key: old -> new' for each differing top-level entry (for refusal messages)."""
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs)


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."
