"""Figures: one seaborn theme, one colour and name per method, PNG + PDF written atomically.

Notebooks call :func:`set_theme` once, draw with the helpers below (or plain seaborn using
:func:`method_palette`), and save with :func:`save_fig`, so every figure of the project looks
alike and is rebuilt from the tidy results files alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from kvp.results import atomic_path

DPI = 150


@dataclass(frozen=True)
class MethodStyle:
    """How a method appears in every figure: its display name, colour and marker."""

    label: str
    color: str
    marker: str


# Recompute-free methods in blues/greens, partial-recompute baselines in warm colours,
# reference points (no cache / full recompute) in greys.
METHOD_STYLE: dict[str, MethodStyle] = {
    "no_cache": MethodStyle("No Cache", "#4d4d4d", "o"),
    "full_recompute": MethodStyle("Full Recompute", "#9e9e9e", "s"),
    "no_recompute": MethodStyle("No Recompute", "#6baed6", "v"),
    "kv_packet": MethodStyle("KV Packet", "#08519c", "*"),
    "cache_blend": MethodStyle("CacheBlend", "#e6550d", "^"),
    "epic": MethodStyle("EPIC", "#fdae6b", "D"),
    "a3": MethodStyle("A³", "#756bb1", "P"),
    "sam_kv": MethodStyle("SAM-KV", "#31a354", "X"),
    "rand_recompute": MethodStyle("Random Recompute", "#d6616b", "h"),
}


def set_theme() -> None:
    """Apply the project's seaborn theme (call once at the top of a notebook)."""
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.2,
                  rc={"figure.dpi": 100, "savefig.dpi": DPI, "savefig.bbox": "tight"})


def method_style(method: str) -> MethodStyle:
    """The style of ``method``; a method without one is shown under its own name in grey."""
    return METHOD_STYLE.get(method, MethodStyle(method, "#bdbdbd", "o"))


def method_label(method: str) -> str:
    """Display name of ``method`` (for legends and tick labels)."""
    return method_style(method).label


def method_palette(methods: list[str] | None = None) -> dict[str, str]:
    """Method → colour, for seaborn's ``palette=`` (all styled methods by default)."""
    return {m: method_style(m).color for m in (methods if methods is not None else METHOD_STYLE)}


def method_order(methods: Iterable[str]) -> list[str]:
    """The methods present in ``methods``, in the canonical order of :data:`METHOD_STYLE`."""
    present = list(dict.fromkeys(methods))
    known = [m for m in METHOD_STYLE if m in present]
    return known + [m for m in present if m not in METHOD_STYLE]


def save_fig(fig: plt.Figure, name: str, fig_dir: str | Path = "figures") -> tuple[Path, Path]:
    """Save ``fig`` as ``<fig_dir>/<name>.png`` (``DPI`` dpi) and a vector ``.pdf`` twin.

    Both files are written atomically. Returns the (png, pdf) paths.
    """
    if Path(name).suffix in {".png", ".pdf"}:
        raise ValueError(f"save_fig name {name!r} has an extension; pass the bare name, e.g. "
                         f"{Path(name).stem!r}: both .png and .pdf are written")
    paths = Path(fig_dir) / f"{name}.png", Path(fig_dir) / f"{name}.pdf"
    for path in paths:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    return paths


def plot_method_bars(
    df: pd.DataFrame,
    metric: str,
    ci_low: str | None = None,
    ci_high: str | None = None,
    ax: plt.Axes | None = None,
    *,
    x: str = "method",
    log: bool = False,
) -> plt.Axes:
    """One bar per method (already aggregated rows), with asymmetric CI error bars if given.

    ``df`` has one row per method (e.g. a slice of ``summary.csv``) with columns ``method``,
    ``metric`` and optionally ``ci_low``/``ci_high`` (absolute bounds, not half-widths).
    ``log=True`` puts the value axis on a log scale (FLOPs, TTFT).
    """
    ax = ax or plt.gca()
    rows = df.set_index(x).loc[method_order(df[x])].reset_index()
    colors = [method_style(m).color for m in rows[x]]
    yerr = None
    if ci_low and ci_high:
        yerr = [(rows[metric] - rows[ci_low]).clip(lower=0), (rows[ci_high] - rows[metric]).clip(lower=0)]
    ax.bar(range(len(rows)), rows[metric], color=colors, yerr=yerr, capsize=3)
    ax.set_xticks(range(len(rows)), [method_label(m) for m in rows[x]], rotation=30, ha="right")
    ax.set_xlabel("")
    ax.set_ylabel(metric)
    if log:
        ax.set_yscale("log")
    return ax


def plot_method_lines(
    df: pd.DataFrame,
    x: str,
    y: str,
    ax: plt.Axes | None = None,
    *,
    hue: str = "method",
    ci_low: str | None = None,
    ci_high: str | None = None,
    logx: bool = False,
    logy: bool = False,
) -> plt.Axes:
    """``y`` against ``x`` (compression ratio, context length, ...), one styled line per method.

    With ``ci_low``/``ci_high`` the interval is drawn as a shaded band; ``logx``/``logy`` switch
    the axes to log scale (log-log for scaling plots).
    """
    ax = ax or plt.gca()
    for method in method_order(df[hue]):
        part = df[df[hue] == method].sort_values(x)
        style = method_style(method)
        ax.plot(part[x], part[y], color=style.color, marker=style.marker, label=style.label)
        if ci_low and ci_high:
            ax.fill_between(part[x], part[ci_low], part[ci_high], color=style.color, alpha=0.2)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    ax.legend(frameon=False)
    return ax
