"""Figures: one seaborn theme, one colour and name per method, PNG + PDF written atomically.

Notebooks call :func:`set_theme` once, draw with the helpers below (or plain seaborn using
:func:`method_palette`), and save with :func:`save_fig`, so every figure of the project looks
alike and is rebuilt from the tidy results files alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import FuncFormatter, NullLocator

from kvp.attention import plain_view
from kvp.bench import crossover_tokens, dtype_name, tier_lines, with_tiers
from kvp.blockmask import Layout
from kvp.results import atomic_path, machine

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


def run_caption(model: str, out_dir: str | Path, run: dict | None = None) -> str:
    """``"<model> · <device> · kvp <commit> · <run id>"``, the foot line of a run's figures.

    ``run``: the run's ``DONE.json`` (what re-drawing reads); ``None`` takes the device and commit
    of this process (:func:`kvp.results.machine`, what the pipeline will write there).
    """
    facts = machine() if run is None else run
    commit = str(facts.get("git_commit") or "")[:7]
    return " · ".join(v for v in (model, facts.get("device"), commit and f"kvp {commit}",
                                  Path(out_dir).name) if v)


def save_fig(fig: plt.Figure, name: str, fig_dir: str | Path = "figures",
             caption: str | None = None) -> tuple[Path, Path]:
    """Save ``fig`` as ``<fig_dir>/<name>.png`` (``DPI`` dpi) and a vector ``.pdf`` twin, with
    ``caption`` (e.g. :func:`run_caption`) in small grey type below it.

    Both files are written atomically. Returns the (png, pdf) paths.
    """
    if Path(name).suffix in {".png", ".pdf"}:
        raise ValueError(f"save_fig name {name!r} has an extension; pass the bare name, e.g. "
                         f"{Path(name).stem!r}: both .png and .pdf are written")
    if caption:
        fig.text(0.003, -0.01, caption, fontsize=7, color="0.45", ha="left", va="top")
    paths = Path(fig_dir) / f"{name}.png", Path(fig_dir) / f"{name}.pdf"
    for path in paths:
        # No /CreationDate: an unchanged figure is the same file, so a re-run leaves git clean.
        metadata = {"CreationDate": None} if path.suffix == ".pdf" else None
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, bbox_inches="tight", metadata=metadata)
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


# ------------------------------------------------------------------------ the project's figures
# Runs whose model / dataset / seed equal these write the stable figure names (figures/fig3_...);
# others add their values as suffixes, so several runs can share one FIG_DIR.
PRIMARY_RUN = {"model": "smollm2-135m", "dataset": "biography", "seed": 42}


def figure_name(base: str, **parts: object) -> str:
    """``base`` plus ``_<value>`` for every part that differs from :data:`PRIMARY_RUN`.

    ``figure_name("fig3_main_results", model="smollm2-135m", dataset="niah")`` is
    ``"fig3_main_results_niah"``; the primary run (smollm2-135m, biography, seed 42) gets ``base``.
    Values are made file-name safe (``meta-llama/Llama-3.1-8B`` → ``meta-llama-Llama-3.1-8B``).
    """
    unknown = sorted(set(parts) - set(PRIMARY_RUN))
    if unknown:
        raise ValueError(f"figure_name parts {unknown} are unknown; allowed: {sorted(PRIMARY_RUN)}")
    suffix = [re.sub(r"[^A-Za-z0-9.-]+", "-", str(v)) for k, v in parts.items()
              if v != PRIMARY_RUN[k]]
    return "_".join([base, *suffix])


def setting_label(method: str, setting: str = "") -> str:
    """Display name of a (method, setting) pair, e.g. ``CacheBlend r=0.3`` or ``EPIC 16 tok``."""
    if not isinstance(setting, str) or not setting:
        return method_label(method)
    values = dict(part.split("=", 1) for part in setting.split(",") if "=" in part)
    if "ratio" in values:
        short = f"r={values['ratio']}"
    elif "n_tokens" in values:
        short = f"{values['n_tokens']} tok"
    elif method == "sam_kv":
        short = f"{values.get('initial', '?')}/{values.get('local', '?')}/{values.get('block', '?')}"
    else:
        short = setting
    return f"{method_label(method)} {short}"


def _ordered_settings(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in canonical method order, settings in their order of appearance."""
    order = {m: i for i, m in enumerate(method_order(df["method"]))}
    return df.assign(_o=df["method"].map(order)).sort_values("_o", kind="stable").drop(columns="_o")


def plot_setting_bars(df: pd.DataFrame, metric: str, ax: plt.Axes, *, log: bool = False,
                      ci: tuple[str, str] | None = None, hatch: str | None = None) -> plt.Axes:
    """One bar per (method, setting) row of ``df``, coloured by method, optional CI whiskers."""
    rows = _ordered_settings(df).reset_index(drop=True)
    colors = [method_style(m).color for m in rows["method"]]
    values = rows[metric].astype(float)
    yerr = None
    if ci is not None:
        low, high = rows[ci[0]].astype(float), rows[ci[1]].astype(float)
        yerr = [(values - low).clip(lower=0).fillna(0), (high - values).clip(lower=0).fillna(0)]
    ax.bar(range(len(rows)), values.where(values > 0, 0 if not log else float("nan")),
           color=colors, yerr=yerr, capsize=2.5, hatch=hatch, edgecolor="white" if hatch else None)
    labels = [setting_label(m, s) for m, s in zip(rows["method"], rows["setting"].fillna(""))]
    ax.set_xticks(range(len(rows)), labels, rotation=55, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    if log:
        ax.set_yscale("log")
    return ax


def _plain_log_labels(ax: plt.Axes, axis: str = "y") -> None:
    """Label log axes (``"x"``, ``"y"`` or ``"both"``) with plain numbers (``30``, ``200``)."""
    def minor(value: float, _) -> str:  # label the 2s and 5s between the powers of ten
        mantissa = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0
        return f"{value:g}" if round(mantissa) in (2, 5) else ""

    for which in (("x", "y") if axis == "both" else (axis,)):
        target = ax.xaxis if which == "x" else ax.yaxis
        target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        target.set_minor_formatter(FuncFormatter(minor))


def plot_main_results(summary: pd.DataFrame, reference: pd.DataFrame | None = None,
                      title: str = "") -> plt.Figure:
    """Figure 3: F1 (with 95% CI), FLOPs (log) and TTFT (log) per method and setting.

    ``summary`` has one row per (method, setting) with ``f1_micro, ci_low, ci_high, flops,
    ttft_ms`` (``kvp.evaluate.method_summary``). ``reference`` (optional, the paper's rows for the
    same dataset: ``method, setting, f1, flops, ttft_ms``) is drawn in a separate, hatched second
    row titled as the paper's, never in the panels of this run.
    """
    n_rows = 1 if reference is None or reference.empty else 2
    width = max(12.0, 0.42 * len(summary) * 3)
    fig, axes = plt.subplots(n_rows, 3, figsize=(width, 4.6 * n_rows), squeeze=False)
    flops = summary.assign(flops=summary["flops"].where(summary["flops"] > 0))
    plot_setting_bars(summary, "f1_micro", axes[0, 0], ci=("ci_low", "ci_high"))
    plot_setting_bars(flops, "flops", axes[0, 1], log=True)
    plot_setting_bars(summary, "ttft_ms", axes[0, 2], log=True)
    for ax, label in zip(axes[0], ("token F1 (micro, 95% CI)", "FLOPs at query time", "TTFT (ms)")):
        ax.set_ylabel(label)
    _plain_log_labels(axes[0, 2])
    axes[0, 0].set_ylim(0, min(1.05, max(0.3, 1.15 * float(summary["ci_high"].max()))))
    n = int(summary["n"].max()) if "n" in summary else 0
    axes[0, 1].set_title(f"this run: {title} (N={n})" if title else f"this run (N={n})", fontsize=11)
    if n_rows == 2:
        ref = reference.assign(flops=reference["flops"].where(reference["flops"] > 0))
        plot_setting_bars(reference, "f1", axes[1, 0], hatch="//")
        plot_setting_bars(ref, "flops", axes[1, 1], log=True, hatch="//")
        plot_setting_bars(reference, "ttft_ms", axes[1, 2], log=True, hatch="//")
        for ax, label in zip(axes[1], ("paper: F1", "paper: FLOPs", "paper: TTFT (ms)")):
            ax.set_ylabel(label)
        _plain_log_labels(axes[1, 2])
        axes[1, 0].set_ylim(0, 1.05)
        axes[1, 1].set_title("reference: the paper's numbers (Llama-3.1-8B-Instruct, one GPU, "
                             "N=100), not this run", fontsize=11)
    fig.tight_layout()
    return fig


def plot_attention_shift(deviation: pd.DataFrame, mass: pd.DataFrame, spread: pd.DataFrame,
                         f1: pd.DataFrame) -> plt.Figure:
    """Notebook 01: why concatenating independently encoded caches fails.

    Panels: (a) cosine similarity and (b) relative L2 distance of independently encoded +
    re-rotated document keys/values to the joint encoding, per layer (``kvp.attention.kv_deviation``
    rows, mean over samples, documents 2..N: the first document sees the same context both ways);
    (c) attention mass of the prompt on each document's first token (the sink) and (d) on the
    documents in total, per method (KV Packet's header dotted: its sink moves there) (``attention_mass`` rows with a ``sample_id`` column, mean
    over samples); (e) normalised entropy of the prompt's
    attention over documents (``document_spread``); (f) F1 per method (``method_summary`` rows).
    """
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.2))
    docs = deviation[(deviation["segment"] == "document") & (deviation["document"] > 1)]
    for kind, style in (("key", "-"), ("value", "--")):
        part = docs[docs["kind"] == kind].groupby("layer")[["cosine", "rel_l2"]].mean()
        axes[0, 0].plot(part.index, part["cosine"], style, color="#08519c", label=kind + "s")
        axes[0, 1].plot(part.index, part["rel_l2"], style, color="#e6550d", label=kind + "s")
    axes[0, 0].set(xlabel="layer", ylabel="cosine(independent, joint)",
                   title="(a) KV similarity, documents 2..N")
    axes[0, 1].set(xlabel="layer", ylabel="‖independent − joint‖ / ‖joint‖",
                   title="(b) relative KV distance")
    by_sample = mass.groupby(["method", "layer", "segment", "sample_id"])["mass"].sum()
    per_layer = by_sample.groupby(["method", "layer", "segment"]).mean().reset_index()
    n_docs = int(mass["document"].max())
    for method in method_order(per_layer["method"]):
        style = method_style(method)
        part = per_layer[per_layer["method"] == method]
        first = part[part["segment"] == "first"].set_index("layer")["mass"]
        on_docs = part[part["segment"].isin(["header", "first", "body", "trailer"])]
        on_docs = on_docs.groupby("layer")["mass"].sum()
        axes[0, 2].plot(first.index, first, color=style.color, label=style.label)
        header = part[part["segment"] == "header"].set_index("layer")["mass"]
        if not header.empty:
            axes[0, 2].plot(header.index, header, color=style.color, ls=":",
                            label=f"{style.label}: header tokens")
        axes[1, 0].plot(on_docs.index, on_docs, color=style.color, label=style.label)
        ent = spread[spread["method"] == method].groupby("layer")["entropy"].mean()
        axes[1, 1].plot(ent.index, ent, color=style.color, label=style.label)
    axes[0, 2].set(xlabel="layer", ylabel="attention mass",
                   title=f"(c) prompt → first token of the {n_docs} documents (sinks)")
    axes[1, 0].set(xlabel="layer", ylabel="attention mass", title="(d) prompt → all documents")
    axes[1, 1].set(xlabel="layer", ylabel="normalised entropy (1 = even)",
                   title="(e) spread of attention over documents")
    plot_setting_bars(f1, "f1_micro", axes[1, 2], ci=("ci_low", "ci_high"))
    axes[1, 2].set(ylim=(0, 1.05), ylabel="token F1 (micro, 95% CI)",
                   title=f"(f) answer quality (N={int(f1['n'].max())})")
    for ax in (axes[0, 0], axes[0, 1], axes[0, 2]):
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


LOG_FLOOR = 1e-4  # attention below this is drawn in the floor colour of the log-scale maps
MISSING_COLOR = "#d9d9d9"  # entries a method does not compute (NaN), in figures and the viewer


def log_attention(matrix, floor: float = LOG_FLOOR) -> np.ndarray:
    """log10 of an (N, N) attention matrix (tensor or array), clamped at ``floor``, NaN kept."""
    values = np.asarray(matrix, dtype=float)
    out = np.log10(np.clip(values, floor, None))
    out[np.isnan(values)] = np.nan
    return out


def with_missing(name: str):
    """The colormap ``name`` with NaN (a missing entry) drawn in :data:`MISSING_COLOR`."""
    return matplotlib.colormaps[name].with_extremes(bad=MISSING_COLOR)


def draw_boundaries(ax: plt.Axes, layout: Layout, n: int) -> None:
    """Segment lines on both axes of an (n, n) map; ticks name the preamble, documents and prompt."""
    edges = {layout.preamble[1], layout.final[0]}
    for h, body, t in zip(layout.headers, layout.bodies, layout.trailers):
        edges |= {h[0], body[0], body[1], t[1]}
    for e in sorted(edges - {0, n}):
        major = e in {layout.preamble[1], layout.final[0]} or any(e == d[0] for d in layout.docs)
        style = dict(color="white" if major else "#bbbbbb", lw=0.9 if major else 0.4)
        ax.axvline(e - 0.5, **style)
        ax.axhline(e - 0.5, **style)
    ticks = [(sum(layout.preamble) / 2, "pre")]
    ticks += [((a + b) / 2, f"D{i + 1}") for i, (a, b) in enumerate(layout.bodies)]
    ticks.append((sum(layout.final) / 2, "prompt"))
    ax.set_xticks([p - 0.5 for p, _ in ticks], [s for _, s in ticks], fontsize=8)
    ax.set_yticks([p - 0.5 for p, _ in ticks], [s for _, s in ticks], fontsize=8)


def plot_attention_equivalence(block, cached, full, layer: int) -> plt.Figure:
    """Figure 2: the block-mask forward equals encode-alone + re-rotate; full attention differs.

    ``block``: ``kvp.attention.joint_attention(ctx, "kv_packet")`` (the training-time forward);
    ``cached``: ``kvp.attention.capture(ctx, get_method("kv_packet"))`` (packets encoded alone,
    concatenated, keys re-rotated, prompt prefilled: only the prompt rows exist, the rest NaN);
    ``full``: ``joint_attention(ctx, "full_recompute")``. All of one sample. Top row: the maps of
    ``layer`` (mean over heads, log scale); bottom row: the prompt's rows of the first two and
    their absolute difference.
    """
    mean = {name: amap.probs[layer].float().mean(0) for name, amap in
            (("block", block), ("cached", cached), ("full", full))}  # (N, N) each
    start, n = block.layout.final[0], block.layout.length
    diff = (mean["block"][start:] - mean["cached"][start:]).abs()  # (T, N)
    shared_block, _ = plain_view(block, mean["block"])
    gap = (shared_block[start - (n - full.layout.length):] - mean["full"][full.layout.final[0]:])
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.6), gridspec_kw={"height_ratios": [3, 1.25]},
                             layout="constrained")
    panels = [(full, mean["full"], "full attention, joint prompt\n(what the cache should match)"),
              (block, mean["block"], "block-mask forward (training)\n[preamble][H doc T]…[prompt]"),
              (cached, mean["cached"], "packets encoded alone + re-rotated\n(query time: prompt rows)")]
    for ax, (amap, matrix, title) in zip(axes[0], panels):
        shown = ax.imshow(log_attention(matrix), cmap=with_missing("magma"), vmin=-4, vmax=0,
                          interpolation="nearest")
        draw_boundaries(ax, amap.layout, amap.layout.length)
        ax.set_title(title, fontsize=10)
        ax.grid(False)
    axes[0, 2].text(n / 2, start / 2, "context rows: computed offline,\neach packet encoded alone",
                    ha="center", va="center", fontsize=10, color="#525252")
    fig.colorbar(shown, ax=axes[0, 2], fraction=0.05, pad=0.02, label="log10 attention")
    extent = (-0.5, n - 0.5, n - 0.5, start - 0.5)
    strips = [(mean["block"][start:], "block mask: prompt rows", "magma", (-4, 0)),
              (mean["cached"][start:], "encode alone + re-rotate: prompt rows", "magma", (-4, 0)),
              (diff, f"|difference|: max {float(diff.max()):.1e} (identical up to float error)",
               "viridis", (-9, -1))]
    for ax, (matrix, title, cmap, (lo, hi)) in zip(axes[1], strips):
        shown = ax.imshow(log_attention(matrix, 10.0 ** lo), cmap=with_missing(cmap), vmin=lo,
                          vmax=hi, extent=extent, aspect="auto", interpolation="nearest")
        draw_boundaries(ax, block.layout, n)
        ax.set_ylim(n - 0.5, start - 0.5)
        ax.set_yticks([])
        ax.set_title(title, fontsize=10)
        ax.grid(False)
    fig.colorbar(shown, ax=axes[1, 2], fraction=0.05, pad=0.02, label="log10 |difference|")
    axes[0, 0].set_xlabel(f"differs from the block mask: ½·Σ|Δ| per prompt row = "
                          f"{float(gap.abs().sum(-1).mean()) / 2:.2f} (shared tokens)", fontsize=9)
    fig.suptitle(f"Attention of one sample, layer {layer}, mean over heads", fontsize=12)
    return fig


SEGMENT_COLORS = {"preamble": "#636363", "header": "#31a354", "document": "#08519c",
                  "trailer": "#e6550d"}


def plot_segment_scores(scores: pd.DataFrame, n_samples: int | None = None) -> plt.Figure:
    """Figure 5: pre-softmax scores from the prompt to each context segment, per layer.

    ``scores``: ``kvp.attention.segment_scores`` rows (method, layer, segment, position_bin,
    score), averaged over ``n_samples`` samples (named in the title). One heat map per method (layers × [preamble | header |
    document, resampled | trailer], one colour scale), then the mean score per segment against
    the layer (solid: first method, dashed: the others).
    """
    methods = method_order(scores["method"])
    widths = scores.groupby("segment")["position_bin"].max() + 1
    segments = [s for s in SEGMENT_COLORS if s in widths.index]
    offsets, x0 = {}, 0
    for seg in segments:
        offsets[seg] = x0
        x0 += int(widths[seg]) + 2
    n_layers = int(scores["layer"].max()) + 1
    # Symmetric-log colours: on some models the first layers' scores are ~100x the others'.
    lo, hi = np.nanpercentile(scores["score"], [0.5, 99.5])
    norm = mcolors.SymLogNorm(linthresh=1.0, vmin=lo, vmax=hi)
    fig, axes = plt.subplots(1, len(methods) + 1, figsize=(5.4 * (len(methods) + 1), 5.2),
                             gridspec_kw={"width_ratios": [1.3] * len(methods) + [1]},
                             layout="constrained")
    for ax, method in zip(axes, methods):
        grid = np.full((n_layers, x0 - 2), np.nan)
        part = scores[scores["method"] == method]
        cols = part["segment"].map(offsets) + part["position_bin"]
        grid[part["layer"].to_numpy(), cols.to_numpy()] = part["score"].to_numpy()
        shown = ax.imshow(grid, aspect="auto", cmap=with_missing("viridis"), norm=norm,
                          interpolation="nearest", origin="lower")
        ax.grid(False)
        ax.set_xticks([offsets[s] + widths[s] / 2 - 0.5 for s in segments], segments,
                      rotation=30, fontsize=8)
        ax.set(ylabel="layer", title=method_label(method))
    fig.colorbar(shown, ax=axes[len(methods) - 1], fraction=0.06, pad=0.02,
                 label="q·k/√d, mean of heads, tokens, samples (symlog)")
    means = scores.groupby(["method", "segment", "layer"])["score"].mean()
    for method in methods:
        for seg in segments:
            if (method, seg) in means.index.droplevel(2):
                line = means.loc[(method, seg)]
                axes[-1].plot(line.index, line, color=SEGMENT_COLORS[seg],
                              ls="-" if method == methods[-1] else "--",
                              label=f"{seg} · {method_label(method)}")
    axes[-1].set(xlabel="layer", ylabel="mean q·k/√d (symmetric log)", title="mean per segment")
    axes[-1].set_yscale("symlog", linthresh=1.0)
    axes[-1].legend(frameon=False, fontsize=7)
    if n_samples is not None:
        fig.suptitle(f"Pre-softmax scores per segment, mean over N = {n_samples} samples", fontsize=12)
    return fig


VARIANT_STYLE = {"packet": ("per packet", "#08519c", "o", "-"),
                 "packet_protected": ("per packet, header/trailer kept", "#31a354", "s", "-"),
                 "joint": ("one cache over all documents", "#e6550d", "^", "--")}


def plot_compression(sweep: pd.DataFrame, baselines: pd.DataFrame | None = None) -> plt.Figure:
    """Figure 4: F1 against the fraction of KV removed, one panel per press.

    ``sweep`` rows: press, ratio, variant (``kvp.compress.VARIANTS``), f1_micro and optionally
    ci_low/ci_high and n (the title names N). ``baselines`` (``method_summary`` rows, e.g. uncompressed KV Packet and full
    recompute) are drawn as dashed horizontal lines in every panel.
    """
    presses = list(dict.fromkeys(sweep["press"]))
    ncols = min(3, len(presses))
    nrows = -(-len(presses) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False,
                             sharey=True, layout="constrained")
    highs = [sweep.get("ci_high", sweep["f1_micro"]).max(), sweep["f1_micro"].max()]
    if baselines is not None:
        highs.append(baselines["f1_micro"].max())
    top = min(1.05, max(0.3, 1.15 * float(max(highs))))
    for ax, press in zip(axes.flat, presses):
        part = sweep[sweep["press"] == press]
        for variant, (label, color, marker, ls) in VARIANT_STYLE.items():
            line = part[part["variant"] == variant].sort_values("ratio")
            if line.empty:
                continue
            ax.plot(line["ratio"], line["f1_micro"], color=color, marker=marker, ls=ls, label=label)
            if {"ci_low", "ci_high"} <= set(line.columns):
                ax.fill_between(line["ratio"], line["ci_low"], line["ci_high"], color=color,
                                alpha=0.07)
        for _, row in (baselines if baselines is not None else pd.DataFrame()).iterrows():
            style = method_style(row["method"])
            ax.axhline(row["f1_micro"], color=style.color, ls=":", lw=1.2,
                       label=f"{setting_label(row['method'], row.get('setting', ''))}, uncompressed")
        ax.set(title=press, xlabel="fraction of KV removed", ylim=(0, top))
        ax.set_xticks(sorted(part["ratio"].unique()))
    for ax in axes[:, 0]:
        ax.set_ylabel("token F1 (micro)")
    for ax in list(axes.flat)[len(presses):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", frameon=False)
    if "n" in sweep:
        fig.suptitle(f"F1 under KV compression, N = {int(sweep['n'].max())} samples", fontsize=12)
    return fig


VARIANT_LINES = {"fast": ":", "fast+graph": "-.", "fast+graph+fused": (0, (6, 1.5))}


def line_style(variant: str, setting: str) -> str | tuple:
    """Line style of a latency curve: solid for a method's own path (dotted for its second,
    larger setting), one style per optimised ``kvp.query_step`` variant."""
    if variant == "plain":
        return ":" if "ratio=0.5" in setting else "-"
    return VARIANT_LINES.get(variant, "-.")


def plot_latency_grid(bench: pd.DataFrame) -> plt.Figure:
    """TTFT vs context length, TTFT vs number of documents and FLOPs vs context length.

    ``bench``: rows of ``kvp.bench`` CSVs (status ``ok``), one figure row per (device, model);
    one line per method setting (optimised variants: ``line_style``), log-log axes with
    the measured values as ticks; one legend for the figure. Only packets on the GPU in the
    model's dtype are drawn here (the tiers: ``plot_tier_latency``).
    """
    bench = with_tiers(bench)
    bench = bench[(bench["tier"] == "gpu") & (bench["packet_dtype"] == bench["dtype"].map(dtype_name))]
    ok = bench[bench["status"] == "ok"].assign(setting=lambda d: d["setting"].fillna(""))
    ok = ok.assign(line=[setting_label(m, s.split(",check_layer")[0]) + ("" if v == "plain" else f" [{v}]")
                         for m, s, v in zip(ok["method"], ok["setting"], ok["variant"])])
    sources = list(dict.fromkeys(zip(ok["device"], ok["model"])))
    fig, axes = plt.subplots(len(sources), 3, figsize=(15, 3.9 * len(sources)), squeeze=False,
                             layout="constrained")
    handles: dict[str, object] = {}
    for row, (device, model) in zip(axes, sources):
        g = ok[(ok["device"] == device) & (ok["model"] == model)]
        n_docs = int(g["n_docs"].mode().iloc[0])
        at_docs = g[g["n_docs"] == n_docs]
        others = g[g["n_docs"] != n_docs]
        context = int(others["context_tokens"].mode().iloc[0] if len(others)
                      else g["context_tokens"].max())
        panels = ((row[0], at_docs, "context_tokens", "ttft_ms"),
                  (row[1], g[g["context_tokens"] == context], "n_docs", "ttft_ms"),
                  (row[2], at_docs[at_docs["variant"] == "plain"], "context_tokens", "flops"))
        for ax, part, x, y in panels:
            if part[x].nunique() < 2:  # e.g. a run cut before its document-count sweep
                ax.text(0.5, 0.5, f"one {x.replace('_', ' ')} value only:\nno sweep measured",
                        ha="center", va="center", transform=ax.transAxes, color="0.4")
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            for label, line in part.groupby("line", sort=False):
                line = line.sort_values(x)
                style = method_style(line["method"].iloc[0])
                ls = line_style(line["variant"].iloc[0], line["setting"].iloc[0])
                (handles[label],) = ax.plot(line[x], line[y].where(line[y] > 0), color=style.color,
                                            marker=style.marker, ms=4, ls=ls, label=label)
            ax.set(xscale="log", yscale="log")
            ax.set_xticks(sorted(part[x].unique()))
            ax.xaxis.set_minor_locator(NullLocator())
            _plain_log_labels(ax, "both")
        row[0].set(xlabel="context tokens", ylabel="TTFT (ms, median)",
                   title=f"{model} · {device}\n{n_docs} documents")
        row[1].set(xlabel="documents", ylabel="TTFT (ms, median)",
                   title=f"{model} · {device}\n{context} context tokens")
        row[2].set(xlabel="context tokens", ylabel="query-time FLOPs (analytic)",
                   title=f"{model}\n{n_docs} documents")
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=5,
               frameon=False, fontsize=8)
    return fig


TIER_COLORS = {"gpu": "#1b9e77", "host": "#7570b3", "disk": "#d95f02"}
GRAPH_MARKERS = {1: "s", 2: "v", 4: "^", 8: "<", 16: ">", 32: "D"}  # layers per host -> device copy


def plot_tier_latency(bench: pd.DataFrame) -> plt.Figure:
    """TTFT vs context length with the packets on the GPU, in pinned host memory and on disk
    (solid: the model's dtype, dashed: compact packets) beside full recompute, one panel per
    (device, model), at the sweep's number of documents; each tier's floor dotted and the
    context length where it starts to beat full recompute marked (``kvp.bench.tier_summary``).
    """
    bench = with_tiers(bench)
    lines = tier_lines(bench)
    ok = bench[bench["status"] == "ok"]
    sources = list(dict.fromkeys(zip(lines["device"], lines["model"])))
    if not sources:
        raise ValueError("no KV Packet rows measured: nothing to plot (run kvp.bench with --tiers)")
    fig, axes = plt.subplots(1, len(sources), figsize=(12 * len(sources), 5), squeeze=False,
                             layout="constrained")
    for ax, (device, model) in zip(axes[0], sources):
        mine = lines[(lines["device"] == device) & (lines["model"] == model)]
        n_docs = int(mine["n_docs"].mode().iloc[0])
        mine = mine[mine["n_docs"] == n_docs]
        full = ok[(ok["device"] == device) & (ok["model"] == model) & (ok["n_docs"] == n_docs)
                  & (ok["label"] == "full_recompute")].sort_values("context_tokens")
        ax.plot(full["context_tokens"], full["ttft_ms"], color=method_style("full_recompute").color,
                marker=method_style("full_recompute").marker, lw=2, label="full recompute")
        full_ms = full.set_index("context_tokens")["ttft_ms"]
        for line, g in mine.groupby("line", sort=False):
            g = g.sort_values("context_tokens")
            tier, compact = g["tier"].iloc[0], g["packet_dtype"].iloc[0] in ("fp8", "int8")
            color = TIER_COLORS.get(tier, "0.3")
            cross = crossover_tokens(g.set_index("context_tokens")["ttft_ms"], full_ms)
            note = ("beats recompute at every length" if cross == 0 else "never beats recompute"
                    if cross == float("inf") else f"beats recompute above {cross:,.0f} tokens")
            # the host step as one CUDA graph: square markers, one shape per layers_per_copy
            graph = " graph" in line
            per_copy = re.search(r"layers_per_copy=(\d+)", line)
            marker = (GRAPH_MARKERS.get(int(per_copy.group(1)) if per_copy else 1, "P")
                      if graph else "o")
            ax.plot(g["context_tokens"], g["ttft_ms"], color=color, marker=marker,
                    ms=5 if graph else 4, lw=2 if graph else 1.5, ls="--" if compact else "-",
                    # hollow: a kernel assembly (Triton; "compiled": an earlier compiled one)
                    mfc="white" if re.search("fused_assembly|compiled", line) else color,
                    label=f"KV Packet, {line} ({note})")
            ax.plot(g["context_tokens"], g["floor_ms"], color=color, ls=":", lw=1)
            if 0 < cross < float("inf"):
                ax.axvline(cross, color=color, lw=0.8, alpha=0.6)
        ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="TTFT (ms, median)",
               title=f"{model} · {device}\n{n_docs} documents; dotted: each tier's floor")
        ax.set_xticks(sorted(mine["context_tokens"].unique()))
        ax.xaxis.set_minor_locator(NullLocator())
        _plain_log_labels(ax, "both")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def plot_fidelity_vs_size(summary: pd.DataFrame, paper: list[tuple], parameters: dict[str, float]
                          ) -> plt.Figure:
    """Fidelity against model size on biography (5 documents, standard test): KV Packet F1 as a
    percentage of full recompute's, and agreement with full recompute, per embedded model (mean
    over wrapper seeds, the seed range as an error bar), beside the paper's points (% of F1 only,
    hollow markers).

    ``summary`` is :func:`kvp.report.seed_summary` of the results table; ``paper`` holds
    (label, parameters, full F1, KV Packet F1); ``parameters`` maps model names to counts.
    """
    rows = summary[(summary.dataset == "biography") & (summary.split_shift == "none")
                   & (summary.adapter == "biography") & summary.model.isin(parameters)]
    set_theme()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    rows = rows.assign(size=rows.model.map(parameters)).sort_values("size")
    x = rows["size"]
    ax.errorbar(x, 100 * rows.f1_ratio, yerr=100 * rows.f1_sd / rows.full_f1, marker="o", ls="",
                color="#08519c", capsize=3, label="KV Packet F1, % of full recompute")
    ax.errorbar(x, 100 * rows.agree_mean, yerr=100 * rows.agree_sd, marker="s", ls="",
                color="#d95f02", capsize=3, label="agreement with full recompute (x100)")
    for r, xi in zip(rows.itertuples(), x):
        ax.annotate(f"{r.model}\nn={r.n}, {r.seeds} seed{'s' if r.seeds > 1 else ''}", (xi, 100 * r.f1_ratio),
                    textcoords="offset points", xytext=(0, 8), ha="center", fontsize=6.5)
    for label, size, full, packet in paper:
        ax.scatter([size], [100 * packet / full], marker="o", facecolors="none",
                   edgecolors="#08519c", s=50)
        ax.annotate(label, (size, 100 * packet / full), textcoords="offset points",
                    xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ticks = [1e8, 3e8, 1e9, 3e9, 1e10]
    ax.set_xticks(ticks, ["100M", "300M", "1B", "3B", "10B"])
    ax.minorticks_off()
    ax.set(xlabel="parameters", ylabel="percent", ylim=(0, 105), xlim=(8e7, 1.5e10),
           title="Fidelity vs model size (biography, 5 documents)")
    ax.axhline(100, color="grey", lw=0.5)
    ax.legend(frameon=False, fontsize=7, loc="lower right")
    return fig


def plot_loss(losses: pd.DataFrame, title: str) -> plt.Figure:
    """Training loss per optimiser step and per epoch, and the validation passes when there are
    any, with the selected one marked. ``losses``: the rows of a run's ``loss.csv``
    (``kvp.train.LOSS_COLUMNS``)."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(losses["step"], losses["loss"], color="#9ecae1", lw=1, label="train, per step")
    epochs = losses.groupby("epoch").agg(step=("step", "max"), loss=("loss", "mean"))
    ax.plot(epochs["step"], epochs["loss"], color="#08519c", marker="o", ms=3,
            label="train, epoch mean")
    if "val_loss" in losses and losses["val_loss"].notna().any():
        val = losses.dropna(subset=["val_loss"])
        ax.plot(val["step"], val["val_loss"], color="#d95f02", marker="s", ms=3, label="validation")
        ax.plot(val["step"], val["val_first"], color="#d95f02", ls=":", lw=1,
                label="validation, first answer token")
        chosen = val.loc[val["val_loss"].idxmin()]
        ax.scatter([chosen["step"]], [chosen["val_loss"]], s=60, facecolors="none",
                   edgecolors="black", zorder=5, label=f"selected (step {int(chosen['step'])})")
    ax.set(xlabel="optimiser step", ylabel="loss per sample", title=title)
    ax.legend(frameon=False, fontsize=7)
    return fig


def save_loss_figure(run_dir: str | Path, title: str) -> tuple[Path, Path]:
    """:func:`plot_loss` of ``run_dir``/loss.csv saved as ``run_dir``/loss.png and loss.pdf."""
    set_theme()
    fig = plot_loss(pd.read_csv(Path(run_dir) / "loss.csv"), title)
    try:
        return save_fig(fig, "loss", fig_dir=run_dir)
    finally:
        plt.close(fig)


def save_latency_figures(bench: pd.DataFrame, out: Path) -> list[Path]:
    """Write ``out`` (:func:`plot_latency_grid`) and, when ``bench`` holds packets off the GPU or
    compact ones, ``<out stem>_tiers.png`` (:func:`plot_tier_latency`), atomically; their paths."""
    figures = {out: plot_latency_grid(bench)}
    if (bench["tier"] != "gpu").any() or bench["packet_dtype"].nunique() > 1:
        figures[out.with_name(f"{out.stem}_tiers{out.suffix}")] = plot_tier_latency(bench)
    for path, fig in figures.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
        plt.close(fig)
    return list(figures)
