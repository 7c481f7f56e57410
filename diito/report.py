"""Summarise a sweep: a table of configurations (mean ± std over seeds, best first) and a heatmap.

    python -m diito.report <experiment name | sweep id | parent run id> [--x loss.alpha --y loss.T]

Runs are grouped by the params that vary between them (the seed aside); with a sweep, the table and
the heatmap are also logged to its parent run. Where the training-set size varies, a learning curve
(one line per method, mean ± std over seeds) and the paired differences against KD per size (the
same seeds) are drawn too; ``runs.csv`` exports every run.
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


def axis_order(values: set[str]) -> list[str]:
    """Numbers in numeric order with None (say, the whole training set) last; other values as text."""
    try:
        return sorted(values, key=lambda v: float("inf") if v in ("None", "null", "") else float(v))
    except ValueError:
        return sorted(values, key=str)


def heatmap(rows: list[dict], x: str, y: str, metric: str, path: Path) -> Path:
    """The mean metric over two keys (averaged over any other varying key)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = axis_order({row[x] for row in rows}), axis_order({row[y] for row in rows})
    grid = [[statistics.fmean([r["mean"] for r in rows if r[x] == xv and r[y] == yv] or [float("nan")]) for xv in xs] for yv in ys]
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2.5, 0.9 * len(ys) + 1.8))
    image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(xs)), [_size_label(v) if x == SIZE else v for v in xs])
    ax.set_yticks(range(len(ys)), [_size_label(v) if y == SIZE else v for v in ys])
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


# -- learning curves: the metric against the training-set size ---------------------------------------
SIZE = "trainer.max_train_examples"


def _size_label(value: str) -> str:
    return "all" if value in ("None", "null", "") else value  # no limit: the whole training set


Curves = dict[str, dict[str, dict[str, dict[str, float]]]]  # {setting: {method: {size: {seed: value}}}}


def curves(runs: list[Any], metric: str, size: str = SIZE) -> Curves:
    """The runs' metric by setting (the varying params that are not the method's: say
    ``student.init_from``), method (the ``loss`` tag, with any ``loss.*`` value that varies among
    that method's runs: its tuned setting), size and seed."""
    others = [k for k in varying_keys(runs) if k != size]
    methods = {r.data.tags.get("loss", "?") for r in runs}
    tuned = {m: [k for k in varying_keys([r for r in runs if r.data.tags.get("loss", "?") == m]) if k.startswith("loss.")] for m in methods}
    out: Curves = {}
    for r in runs:
        if metric not in r.data.metrics:
            continue
        p, method = r.data.params, r.data.tags.get("loss", "?")
        setting = ", ".join(f"{k}={p[k]}" for k in others if k in p and not k.startswith("loss."))
        label = method + (" (" + ", ".join(f"{k.removeprefix('loss.')}={p[k]}" for k in tuned[method] if k in p) + ")" if tuned[method] else "")
        out.setdefault(setting, {}).setdefault(label, {}).setdefault(p.get(size, "None"), {})[p.get(REPLICATES, "")] = r.data.metrics[metric]
    return out


def paired(curves_: Curves) -> list[dict]:
    """Per setting and size, each method against KD (or the first method): the difference on the
    seeds both ran (same seeds: the same training subsets and the same teacher), its mean, its std
    and how many seeds it wins."""
    rows = []
    for setting, lines in sorted(curves_.items()):
        names = sorted(lines)
        baseline = next((n for n in names if n.startswith("kd")), names[0])
        for name in (n for n in names if n != baseline):
            for size in axis_order(set(lines[name]) & set(lines[baseline])):
                seeds = sorted(set(lines[name][size]) & set(lines[baseline][size]))
                diffs = [lines[name][size][seed] - lines[baseline][size][seed] for seed in seeds]
                if diffs:
                    rows.append({"setting": setting, "method": name, "baseline": baseline, "size": _size_label(size), "n": len(diffs),
                                 "mean_diff": statistics.fmean(diffs), "std_diff": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                                 "wins": sum(d > 0 for d in diffs)})
    return rows


def _line_name(setting: str, method: str) -> str:
    return method + (f" [{setting}]" if setting else "")


def format_curves(curves_: Curves, comparisons: list[dict], metric: str) -> str:
    sizes = axis_order({size for lines in curves_.values() for line in lines.values() for size in line})
    header = ["method", *(_size_label(s) for s in sizes)]
    body = []
    for setting, lines in sorted(curves_.items()):
        for name in sorted(lines):
            cells = []
            for size in sizes:
                values = list(lines[name].get(size, {}).values())
                cells.append(f"{statistics.fmean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f} (n={len(values)})"
                             if values else "")
            body.append([_line_name(setting, name), *cells])
    widths = [max(len(x) for x in column) for column in zip(header, *body)]
    text = [f"{metric} by training-set size (mean ± std over seeds)"]
    text += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in [header, *body]]
    if comparisons:
        text.append("")
        text.append("paired differences (the same seeds)")
    for row in comparisons:
        text.append(f"{_line_name(row['setting'], row['method'])} - {row['baseline']} at {row['size']}: {row['mean_diff']:+.4f} ± "
                    f"{row['std_diff']:.4f} over {row['n']} seeds ({row['wins']} of {row['n']} better)")
    return "\n".join(text)


def curve_plot(curves_: Curves, metric: str, path: Path) -> Path:
    """The metric against the training-set size, one line per method and setting, error bars of one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {_line_name(setting, name): line for setting, group in curves_.items() for name, line in group.items()}
    sizes = axis_order({size for line in lines.values() for size in line})
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for offset, name in enumerate(sorted(lines)):
        xs = [i + 0.04 * offset for i, size in enumerate(sizes) if size in lines[name]]  # nudged so bars do not hide each other
        values = [list(lines[name][size].values()) for size in sizes if size in lines[name]]
        ax.errorbar(xs, [statistics.fmean(v) for v in values], yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in values],
                    marker="o", capsize=3, label=name)
    ax.set_xticks(range(len(sizes)), [_size_label(s) for s in sizes])
    ax.set_xlabel("training examples")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{metric} (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def seconds(run: Any) -> float | None:
    """A finished run's wall time, start to end (for a resumed run, the time it lay stopped too)."""
    start, end = run.info.start_time, run.info.end_time
    return (end - start) / 1000 if start is not None and end is not None else None


def wall_time(runs: list[Any]) -> str:
    """What the runs cost: their wall time in all, the median run of each method and, for the runs
    that record it, their training time (``time/train_seconds``: a resumed run's without its stop)."""
    durations = [(r.data.tags.get("loss", ""), seconds(r)) for r in runs]
    durations = [(method, d) for method, d in durations if d is not None]
    if not durations:
        return "wall time: unknown"
    methods = sorted({method for method, _ in durations})
    medians = ", ".join(f"{m or 'run'} {statistics.median(d for k, d in durations if k == m):.0f} s" for m in methods)
    line = f"wall time: {len(durations)} runs, {sum(d for _, d in durations) / 3600:.2f} h in all; median per run: {medians}"
    training = [r.data.metrics["time/train_seconds"] for r in runs if "time/train_seconds" in r.data.metrics]
    if training:
        line += f"\ntraining time (time/train_seconds, without stops): {len(training)} runs, {sum(training) / 3600:.2f} h"
    return line


def export_csv(runs: list[Any], path: Path) -> Path:
    """Every run: its id, method, the params that vary, the seed, its wall time and every final metric.
    Not its name: the command line's overrides say nothing the columns do not, and they can carry the
    paths of the machine that ran it (``task.data_dir=...``) into a file meant to be shared."""
    import csv

    keys = varying_keys(runs)
    metrics = sorted({m for r in runs for m in r.data.metrics})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", "method", *keys, REPLICATES, "seconds", *metrics])
        for r in sorted(runs, key=lambda r: r.info.start_time):
            duration = seconds(r)
            writer.writerow([r.info.run_id, r.data.tags.get("loss", ""), *(r.data.params.get(k, "") for k in keys),
                             r.data.params.get(REPLICATES, ""), "" if duration is None else f"{duration:.1f}",
                             *(r.data.metrics.get(m, "") for m in metrics)])
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diito.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="experiment name, sweep id (tag diito.sweep_id) or the sweep's parent run id")
    parser.add_argument("--metric", default="validation/accuracy")
    parser.add_argument("--x", help="heatmap columns (default: the first varying key)")
    parser.add_argument("--y", help="heatmap rows (default: the second varying key)")
    parser.add_argument("--size", default=SIZE, help=f"the key of the learning curve, drawn when it varies (default {SIZE})")
    parser.add_argument("--out", default=".", help="folder for the table, the heatmap, the learning curve and runs.csv")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}"))
    args = parser.parse_args(argv)

    try:
        runs, parent_id = tracking.find_student_runs(args.tracking_uri, args.target)
    except LookupError as e:
        raise SystemExit(f"error: {e}") from None
    if not runs:
        raise SystemExit(f"error: no finished runs for {args.target!r}")
    keys, rows = table(runs, args.metric)
    text = format_table(keys, rows, args.metric) + "\n\n" + wall_time(runs)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.txt").write_text(text + "\n")
    files = [out / "report.txt"]
    # a study over sizes: sizes against the first other varying key, unless told otherwise
    axes = [k for k in (args.x, args.y) if k] or ([args.size, *[k for k in keys if k != args.size][:1]] if args.size in keys else keys[:2])
    if len(axes) == 2:
        files.append(heatmap(rows, axes[0], axes[1], args.metric, out / "heatmap.png"))
        print(f"heatmap: {files[-1]}")
    files.append(export_csv(runs, out / "runs.csv"))
    if args.size in keys:  # a learning curve: one line per method, and the paired differences
        lines = curves(runs, args.metric, args.size)
        curve_text = format_curves(lines, paired(lines), args.metric)
        print(curve_text)
        (out / "by_size.txt").write_text(curve_text + "\n")
        files += [out / "by_size.txt", curve_plot(lines, args.metric, out / "by_size.png")]
        print(f"learning curve: {files[-1]}")
    if parent_id is not None:
        tracking.log_files(args.tracking_uri, parent_id, files, "report")
        print(f"logged to the sweep's parent run {parent_id}")


if __name__ == "__main__":
    main()
