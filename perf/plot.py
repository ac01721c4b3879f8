"""Draw the plots of perf result files: ``<suite>.json`` -> ``<suite>.png`` beside it.

Usage (from the repository root; plotting needs no GPU, only matplotlib)::

    python perf/plot.py                                   # every perf/results/<gpu>/*.json
    python perf/plot.py perf/results/nvidia-h100-80gb-hbm3
    python perf/plot.py some/nm_linear.json --out /tmp/plots

Each result file carries a ``"plot"`` spec written by its suite (``perf.harness.PlotSpec``): which
field is x and y, which fields split panels, colors and line styles, which rows to leave out (the
baseline), the x scale and a reference line. This script only reads the file, so measuring and
plotting stay separate steps and a new suite needs no change here. For ``nm_linear`` that means:
speedup over dense cuBLAS against tokens M (log2 axis), one line per N:M pattern and implementation,
one panel per (shape, dtype), and a line at 1.0.

Two optional spec keys: ``"curves"`` (``[{"label", "points": [[x, y], ...]}]``) are reference curves drawn
in every panel (dotted black), and ``"also"`` is a list of further specs, each with a ``"name"``, drawn to
``<suite>-<name>.png``. The ``attention`` suite uses both: speedup over its own dense mode against block
sparsity with the ideal 1/(1-s) curve (``attention.png``), speedup over dense SDPA against block sparsity
(``attention-vs-sdpa.png``), and decode speedup over dense SDPA against S (``attention-decode.png``). The
``act_sparse`` suite draws speedup over dense cuBLAS against union sparsity at batch 1 with the ideal 1/(1-s)
(``act_sparse.png``), against batch at 50 % (``-batch``), the fused FFN (``-ffn``), N:M + activation (``-nm``)
and the decode linear stack (``-decode``).

This file imports nothing from the repository, so it also runs as a plain script.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def find_result_files(paths: Sequence[Path]) -> list[Path]:
    """Result files named by ``paths``: files as given; a directory gives its ``*.json`` and ``*/*.json``."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(p.glob("*.json")) + sorted(p.glob("*/*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"plot: no such file or directory: {p}")
    return list(dict.fromkeys(f for f in files if not f.name.startswith(".")))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _excluded(row: Mapping[str, Any], exclude: Mapping[str, Iterable[Any]]) -> bool:
    return any(row.get(key) in list(values) for key, values in exclude.items())


def select_series(rows: Sequence[Mapping[str, Any]], spec: Mapping[str, Any]
                  ) -> dict[tuple[Any, ...], dict[tuple[Any, Any], list[tuple[float, float]]]]:
    """``{panel key: {(color value, style value): [(x, y), ...] sorted by x}}`` in first-seen order."""
    panels: dict[tuple[Any, ...], dict[tuple[Any, Any], list[tuple[float, float]]]] = {}
    panel_fields = list(spec.get("panel") or [])
    color, style = spec.get("color"), spec.get("style")
    for row in rows:
        if _excluded(row, spec.get("exclude") or {}):
            continue
        x, y = _number(row.get(spec["x"])), _number(row.get(spec["y"]))
        if x is None or y is None:
            continue
        key = tuple(row.get(f) for f in panel_fields)
        series = (row.get(color) if color else None, row.get(style) if style else None)
        panels.setdefault(key, {}).setdefault(series, []).append((x, y))
    for series in panels.values():
        for points in series.values():
            points.sort()
    return panels


def _provenance(doc: Mapping[str, Any]) -> str:
    env = doc.get("env") or {}
    gpu = (env.get("gpu") or {}).get("name") or "no GPU"
    v = env.get("versions") or {}
    git = env.get("git") or {}
    commit = git.get("commit") or "unknown commit"
    if git.get("dirty"):
        commit += "+dirty"
    parts = [gpu, f"torch {v.get('torch')}", f"triton {v.get('triton')}", f"CUDA {v.get('cuda')}", commit,
             str(env.get("date_utc") or "")]
    if not doc.get("complete", True):
        parts.append("INCOMPLETE run")
    return " | ".join(p for p in parts if p)


def _wrap(text: str, width: int, sep: str = " | ") -> str:
    """Break ``text`` at ``sep`` boundaries into lines of at most ``width`` characters."""
    lines: list[str] = []
    for part in text.split(sep):
        if lines and len(lines[-1]) + len(sep) + len(part) <= width:
            lines[-1] += sep + part
        else:
            lines.append(part)
    return "\n".join(lines)


def plot_specs(doc: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """``[(file suffix, spec)]``: the document's plot spec (suffix ``""``) and each of its ``"also"`` specs
    (suffix ``"-<name>"``)."""
    spec = doc.get("plot")
    if not spec:
        return []
    out: list[tuple[str, Mapping[str, Any]]] = [("", spec)]
    for i, extra in enumerate(spec.get("also") or []):
        if extra:
            out.append((f"-{extra.get('name') or i + 1}", extra))
    return out


def plot_document(doc: Mapping[str, Any], out_png: Path, spec: Mapping[str, Any] | None = None) -> Path | None:
    """Draw one result document to ``out_png`` with ``spec`` (default: the document's own plot spec); None
    when there is no spec or nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = doc.get("plot") if spec is None else spec
    if not spec:
        return None
    panels = select_series(doc.get("rows") or [], spec)
    if not panels:
        return None
    n = len(panels)
    ncols = min(4, max(1, math.ceil(math.sqrt(n))))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.4 * nrows + 1.0), squeeze=False)

    colors = list(dict.fromkeys(c for series in panels.values() for c, _ in series))
    styles = list(dict.fromkeys(s for series in panels.values() for _, s in series))
    cmap = plt.get_cmap("tab10")
    handles: dict[str, Any] = {}
    for ax, (key, series) in zip(axes.flat, panels.items()):
        xs_all: set[float] = set()
        for (c, s), points in sorted(series.items(), key=lambda kv: (colors.index(kv[0][0]),
                                                                    styles.index(kv[0][1]))):
            xs, ys = zip(*points)
            xs_all.update(xs)
            label = " ".join(str(v) for v in (c, s) if v is not None) or spec["y"]
            (line,) = ax.plot(xs, ys, color=cmap(colors.index(c) % 10),
                              linestyle=LINESTYLES[styles.index(s) % len(LINESTYLES)],
                              marker=MARKERS[styles.index(s) % len(MARKERS)], markersize=4, label=label)
            handles.setdefault(label, line)
        for curve in spec.get("curves") or []:
            pts = [(x, y) for x, y in (curve.get("points") or []) if _number(x) is not None and _number(y) is not None]
            if pts:
                cx, cy = zip(*pts)
                (line,) = ax.plot(cx, cy, color="black", linestyle=":", linewidth=1.0, zorder=1,
                                  label=str(curve.get("label") or "reference"))
                handles.setdefault(line.get_label(), line)
        if spec.get("hline") is not None:
            ax.axhline(spec["hline"], color="black", linewidth=0.8, linestyle="--", zorder=0)
        xscale = spec.get("xscale", "linear")
        if xscale in ("log2", "log10"):
            ax.set_xscale("log", base=2 if xscale == "log2" else 10)
            ticks = sorted(xs_all)
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        if spec.get("yscale", "linear") != "linear":
            ax.set_yscale(spec["yscale"])
        ax.set_title(" ".join(str(v) for v in key), fontsize=10)
        ax.set_xlabel(spec.get("xlabel") or spec["x"])
        ax.set_ylabel(spec.get("ylabel") or spec["y"])
        ax.grid(True, linewidth=0.3, alpha=0.6)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)

    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
               ncol=min(len(handles), 6), fontsize=9, frameon=False)
    title = spec.get("title") or str(doc.get("suite"))
    fig.suptitle(f"{title}\n{_wrap(_provenance(doc), width=int(32 * ncols))}", fontsize=10)
    legend_rows = math.ceil(len(handles) / 6)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * legend_rows / nrows, 1, 1))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot_file(path: Path, out_dir: Path | None = None) -> Path | None:
    """Plot ``path`` to ``<its directory>/<stem>.png``, or ``<out_dir>/<gpu dir>/<stem>.png``."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    target = path.parent if out_dir is None else out_dir / path.parent.name
    out_png = target / f"{path.stem}.png"
    return plot_document(doc, out_png)


def plot_file_all(path: Path, out_dir: Path | None = None) -> list[Path]:
    """Every plot of ``path``: ``<stem>.png`` and one ``<stem>-<name>.png`` per ``"also"`` spec."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    target = path.parent if out_dir is None else out_dir / path.parent.name
    pngs = [plot_document(doc, target / f"{path.stem}{suffix}.png", spec) for suffix, spec in plot_specs(doc)]
    return [p for p in pngs if p is not None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perf/plot.py", description="Plot perf result files (JSON -> PNG).")
    parser.add_argument("paths", nargs="*", type=Path, default=[RESULTS_DIR],
                        help=f"result files or directories (default {RESULTS_DIR})")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the PNGs under OUT/<gpu dir>/ instead of beside each JSON")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401 - fail early with a clear message
    except ImportError:
        print("plot: matplotlib is not installed; copy the JSON files to a machine that has it", file=sys.stderr)
        return 3
    try:
        files = find_result_files(args.paths)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not files:
        print(f"plot: no result files under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    status = 0
    for f in files:
        try:
            pngs = plot_file_all(f, args.out)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"plot: {f}: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"plot: {f} -> {', '.join(map(str, pngs))}" if pngs
              else f"plot: {f}: nothing to plot (no plot spec or no rows)")
    return status


if __name__ == "__main__":
    sys.exit(main())
