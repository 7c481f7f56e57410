"""Summarise a sweep: a table of configurations (mean ± std over seeds, best first) and a heatmap.

    python -m diito.report <experiment name | sweep id | parent run id> [--x loss.alpha --y loss.T]

Runs are grouped by the params that vary between them (the seed aside); with a sweep, the table and
the heatmap are also logged to its parent run.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from typing import Any

from diito import tracking

REPLICATES = "seed"  # runs that differ only in their seed are one configuration


def varying_keys(runs: list[Any]) -> list[str]:
    """Params with more than one value among the runs that have them (a KD baseline has no
    interchange_prop: that alone does not make it another configuration). Runs log only settings
    that can change a result, so only those, and never the seed, tell configurations apart."""
    keys = sorted({k for r in runs for k in tracking.result_settings(r.data.params) if k != REPLICATES and not k.startswith("sweep.")})
    return [k for k in keys if len({r.data.params[k] for r in runs if k in r.data.params}) > 1]


def table(runs: list[Any], metric: str) -> tuple[list[str], list[dict]]:
    """One row per configuration: its varying params, the number of seeds, mean and std, best first."""
    keys = varying_keys(runs)
    groups: dict[tuple, list[float]] = {}
    for r in runs:
        if metric in r.data.metrics:
            groups.setdefault(tuple(r.data.params.get(k) for k in keys), []).append(r.data.metrics[metric])
    rows = [dict(zip(keys, config)) | {"n": len(values), "mean": statistics.fmean(values),
                                       "std": statistics.stdev(values) if len(values) > 1 else 0.0}
            for config, values in groups.items()]
    return keys, sorted(rows, key=lambda row: row["mean"], reverse=True)


def format_table(keys: list[str], rows: list[dict], metric: str) -> str:
    header = [*keys, "n", metric]
    body = [[str(row[k]) for k in keys] + [str(row["n"]), f"{row['mean']:.4f} ± {row['std']:.4f}"] for row in rows]
    widths = [max(len(x) for x in column) for column in zip(header, *body)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in [header, *body])


def heatmap(rows: list[dict], x: str, y: str, metric: str, path: Path) -> Path:
    """The mean metric over two keys (averaged over any other varying key)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def order(key: str) -> list[str]:
        values = sorted({row[key] for row in rows}, key=str)
        try:
            return sorted(values, key=float)
        except ValueError:
            return values

    xs, ys = order(x), order(y)
    grid = [[statistics.fmean([r["mean"] for r in rows if r[x] == xv and r[y] == yv] or [float("nan")]) for xv in xs] for yv in ys]
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2.5, 0.9 * len(ys) + 1.8))
    image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(xs)), xs)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white", fontsize=9)
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(f"{metric}: mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diito.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="experiment name, sweep id (tag diito.sweep_id) or the sweep's parent run id")
    parser.add_argument("--metric", default="validation/accuracy")
    parser.add_argument("--x", help="heatmap columns (default: the first varying key)")
    parser.add_argument("--y", help="heatmap rows (default: the second varying key)")
    parser.add_argument("--out", default=".", help="folder for the table and heatmap files")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}"))
    args = parser.parse_args(argv)

    try:
        runs, parent_id = tracking.find_student_runs(args.tracking_uri, args.target)
    except LookupError as e:
        raise SystemExit(f"error: {e}") from None
    if not runs:
        raise SystemExit(f"error: no finished runs for {args.target!r}")
    keys, rows = table(runs, args.metric)
    text = format_table(keys, rows, args.metric)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.txt").write_text(text + "\n")
    files = [out / "report.txt"]
    axes = [k for k in (args.x, args.y) if k] or keys[:2]
    if len(axes) == 2:
        files.append(heatmap(rows, axes[0], axes[1], args.metric, out / "heatmap.png"))
        print(f"heatmap: {files[-1]}")
    if parent_id is not None:
        tracking.log_files(args.tracking_uri, parent_id, files, "report")
        print(f"logged to the sweep's parent run {parent_id}")


if __name__ == "__main__":
    main()
