"""A benchmark's work folder: the one given (`--work`, kept for a later look or re-run), else a
fresh temporary one removed when the benchmark exits. The synthetic checkpoints run to GBs each, and
temporary folders left behind filled this machine's disk once."""

import atexit
import shutil
import tempfile
from pathlib import Path


def work_dir(given: Path | None, prefix: str) -> Path:
    """`given` (created if missing), or a temporary folder that is removed at exit, failed runs too."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        return given
    made = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, made, ignore_errors=True)
    return made
