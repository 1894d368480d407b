"""Byte sizes as people write and read them: `5GB`, `500MB`, `512MiB` in; `3.71 MB` out.

A size on the command line must carry its unit: a bare `5` read as five bytes once wrote 129
shards of a small model without a word.
"""

from __future__ import annotations

import re

from moeport.errors import MoeportError

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(I?)B?|B)\s*")


def parse_size(text: str, option: str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 512 * 2**20, '100B' -> 100; a unit is required."""
    m = _SIZE.fullmatch(text.upper())
    if not m:
        raise MoeportError(f"{option} {text}: expected a size with its unit, such as 5GB, 500MB or 512MiB")
    base = 1024 if m[3] else 1000
    return int(float(m[1]) * base ** " KMGT".index(m[2] or " "))


def format_size(n: int) -> str:
    """Three significant digits in the largest unit that keeps the number at or above 1 (decimal
    units, as disks count): 630.72e6 -> '631 MB', 1e6 -> '1 MB'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"
