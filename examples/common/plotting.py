"""Metrics JSON and loss-curve figures, drawn on matplotlib's Agg canvas.

The Agg canvas directly, not pyplot: no global backend switch, no GUI, no figure registry.
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple


class Series(NamedTuple):
    """One line of a panel: x and y values, a legend label and matplotlib style keywords."""

    x: Sequence[float]
    y: Sequence[float]
    label: str
    style: dict[str, Any] | None = None


class Panel(NamedTuple):
    """One axes: its lines, title, axis labels, optional ``ax.set`` keywords and whether
    the x ticks are integers only (epochs)."""

    series: Sequence[Series]
    title: str
    xlabel: str
    ylabel: str
    options: dict[str, Any] | None = None
    integer_x: bool = False


def plot_panels(path: Path, panels: Sequence[Panel], title: str, *, width: float = 5.0) -> None:
    """Saves ``panels`` side by side as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width * len(panels), 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        for s in panel.series:
            ax.plot(s.x, s.y, label=s.label, **(s.style or {}))
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel, **(panel.options or {}))
        ax.grid(alpha=0.3)
        if any(s.label for s in panel.series):
            ax.legend()
        if panel.integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Writes ``record`` as indented JSON."""
    Path(path).write_text(json.dumps(record, indent=1))


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
