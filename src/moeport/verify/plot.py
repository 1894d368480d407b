"""Per-layer error chart (matplotlib), so a person spots outlier layers at a glance."""

from __future__ import annotations

from pathlib import Path

from moeport.errors import MoeportError
from moeport.verify.compare import Report


def require_matplotlib() -> None:
    """Checked before a long comparison, so a missing extra is said at once, not after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MoeportError("--plot needs matplotlib (pip install 'moeport[plot]')") from None


def plot(report: Report, path: Path) -> None:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.per_layer()
    labels = list(rows)
    worst = [max(rows[k]["max_rel_l2"], 1e-12) for k in labels]
    colors = ["tab:red" if rows[k]["flagged"] else "tab:blue" for k in labels]
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.35), 3.5))
    ax.bar(labels, worst, color=colors)
    ax.set_yscale("log")
    ax.set_xlabel("layer ('-': outside the layers)")
    ax.set_ylabel("max relative L2 error")
    verdict = "OK" if report.ok else f"FAIL: {len(report.flagged)} flagged, {len(report.missing)} missing"
    ax.set_title(f"moeport verify ({'lossless' if report.lossless else 'lossy'}): {verdict}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
