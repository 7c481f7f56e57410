"""Summarise a sweep: a table of configurations (mean ± std over seeds, best first) and a heatmap.

    python -m diito.report <experiment name | sweep id | parent run id> [--x loss.alpha --y loss.T]

Runs are grouped by the params that vary between them (the seed aside); with a sweep, the table and
the heatmap are also logged to its parent run. Where the runs hold several methods, each is compared
with KD on the same seeds (interval, t-test, sign test with ties apart, Holm's correction, a verdict),
the split that chose nothing first. Where the training-set size varies, a learning curve (one line per
method, mean ± std over seeds, and the paired differences) is drawn too; ``runs.csv`` exports every
run, and a runs.csv is read back in place of a store.
"""

from __future__ import annotations

import argparse
import ast
import math
import statistics
from pathlib import Path
from typing import Any

from diito import identity, tags, tracking
from diito.console import columns

REPLICATES = "seed"  # runs that differ only in their seed are one configuration


ABSENT = "None"  # a setting a run left unset logs no param: it used no such feature
APART = ("task.", "teacher.", "data_digest", "trainer.max_train_examples", "trainer.max_eval_examples")
"""Keys whose runs are never averaged into one heatmap cell: another task, teacher or data limit is
another experiment, not a seed of the same one."""


def varying_keys(runs: list[Any]) -> list[str]:
    """Params with more than one value among the runs (a run without the param counts as unset).
    A KD baseline logs no interchange or mapping settings: among the loss, intervention and mapping keys, only
    the runs of methods that log the key count, so that alone does not make it another
    configuration. Runs log only settings that can change a result, so only those, and never the
    seed, tell configurations apart."""
    keys = sorted({k for r in runs for k in identity.result_settings(r.data.params) if k != REPLICATES and not k.startswith("sweep.")})
    method = lambda r: r.data.tags.get(tags.LOSS, "?")  # noqa: E731
    varying = []
    for k in keys:
        users = {method(r) for r in runs if k in r.data.params}
        counted = [r for r in runs if not k.startswith(("loss.", "intervention.", "mapping.")) or method(r) in users]
        if len({r.data.params.get(k, ABSENT) for r in counted}) > 1:
            varying.append(k)
    return varying


def table(runs: list[Any], metric: str) -> tuple[list[str], list[dict]]:
    """One row per configuration: its varying params, the number of seeds, mean and std, best first."""
    keys = varying_keys(runs)
    groups: dict[tuple, list[float]] = {}
    for r in runs:
        if metric in r.data.metrics:
            groups.setdefault(tuple(r.data.params.get(k, ABSENT) for k in keys), []).append(r.data.metrics[metric])
    rows = [
        dict(zip(keys, config))
        | {"n": len(values), "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        for config, values in groups.items()
    ]
    return keys, sorted(rows, key=lambda row: row["mean"], reverse=True)


def format_table(keys: list[str], rows: list[dict], metric: str) -> str:
    header = [*keys, "n", metric]
    body = [[str(row[k]) for k in keys] + [str(row["n"]), f"{row['mean']:.4f} ± {row['std']:.4f}"] for row in rows]
    return "\n".join(columns([header, *body]))


def axis_order(values: set[str]) -> list[str]:
    """Numbers in numeric order with None (say, the whole training set) last; other values as text."""
    try:
        return sorted(values, key=lambda v: float("inf") if v in ("None", "null", "") else float(v))
    except ValueError:
        return sorted(values, key=str)


def heatmap(rows: list[dict], x: str, y: str, metric: str, path: Path, subset: str = "") -> Path:
    """The mean metric over two keys (averaged over any other varying key: the caller passes the
    rows of one task, teacher and data limit, named by ``subset``)."""
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
    ax.set_title(f"{metric}: mean over seeds" + (f"\n{subset}" if subset else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- learning curves: the metric against the training-set size ---------------------------------------
SIZE = "trainer.max_train_examples"


def _size_label(value: str) -> str:
    return "all" if value in ("None", "null", "") else value  # no limit: the whole training set


METHOD_SETTINGS = ("loss.", "intervention.")  # the params that make a method: its loss terms, and how its interventions are drawn
Curves = dict[str, dict[str, dict[str, dict[str, float]]]]  # {setting: {method: {size: {seed: value}}}}


def curves(runs: list[Any], metric: str, size: str = SIZE) -> Curves:
    """The runs' metric by setting (the varying params that are not the method's: say
    ``student.init_from``), method (the ``loss`` tag, with any ``loss.*`` or ``intervention.*`` value that varies among
    that method's runs: its tuned setting), size and seed."""
    others = [k for k in varying_keys(runs) if k != size]
    methods = {r.data.tags.get(tags.LOSS, "?") for r in runs}
    tuned = {
        m: [k for k in varying_keys([r for r in runs if r.data.tags.get(tags.LOSS, "?") == m]) if k.startswith(METHOD_SETTINGS)]
        for m in methods
    }
    out: Curves = {}
    for r in runs:
        if metric not in r.data.metrics:
            continue
        p, method = r.data.params, r.data.tags.get(tags.LOSS, "?")
        setting = ", ".join(f"{k}={p[k]}" for k in others if k in p and not k.startswith(METHOD_SETTINGS))
        label = method + (" (" + ", ".join(f"{k.split('.', 1)[1]}={p[k]}" for k in tuned[method] if k in p) + ")" if tuned[method] else "")
        out.setdefault(setting, {}).setdefault(label, {}).setdefault(p.get(size, "None"), {})[p.get(REPLICATES, "")] = r.data.metrics[
            metric
        ]
    return out


def compare(diffs: list[float]) -> dict[str, float | int]:
    """What a set of paired differences supports: their mean, a 95% t interval and a paired t-test's
    p-value (the t-test on the differences), and an exact sign test with ties left out (a tie is
    neither a win nor a loss, and carries no evidence either way)."""
    from scipy import stats

    n, mean = len(diffs), statistics.fmean(diffs)
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    std = statistics.stdev(diffs) if n > 1 else math.nan
    if n < 2:
        p_t, low, high = math.nan, math.nan, math.nan
    elif std == 0:  # every seed moved by exactly the same amount: no spread to test against
        p_t, low, high = (1.0 if mean == 0 else 0.0), mean, mean
    else:
        test = stats.ttest_1samp(diffs, 0.0)
        interval = test.confidence_interval(0.95)
        p_t, low, high = float(test.pvalue), float(interval.low), float(interval.high)
    p_sign = float(stats.binomtest(wins, wins + losses).pvalue) if wins + losses else 1.0
    return {
        "n": n,
        "mean_diff": mean,
        "std_diff": 0.0 if n < 2 else std,
        "ci_low": low,
        "ci_high": high,
        "p_t": p_t,
        "wins": wins,
        "ties": n - wins - losses,
        "losses": losses,
        "p_sign": p_sign,
    }


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error over the comparisons given); NaN stays NaN and
    is not counted. A few lines of arithmetic, not worth a dependency (statsmodels' multipletests
    gives the same numbers)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


ALPHA = 0.05  # the level a verdict is given at, after correction


def verdict(row: dict) -> str:
    if math.isnan(row["p_holm"]):
        return "too few seeds to test"
    if row["p_holm"] < ALPHA:
        return f"supported at {ALPHA} after correction ({'better' if row['mean_diff'] > 0 else 'worse'})"
    return f"not supported at {ALPHA} after correction"


def paired(curves_: Curves, metric: str = "") -> list[dict]:
    """Per setting and size, each method against KD (or the first method) on the seeds both ran (same
    seeds: the same teacher, and the same training subsets or the same draws of them), as
    :func:`compare` describes them."""
    rows = []
    for setting, lines in sorted(curves_.items()):
        names = sorted(lines)
        baseline = next((n for n in names if n.startswith("kd")), names[0])
        for name in (n for n in names if n != baseline):
            for size in axis_order(set(lines[name]) & set(lines[baseline])):
                seeds = sorted(set(lines[name][size]) & set(lines[baseline][size]))
                diffs = [lines[name][size][seed] - lines[baseline][size][seed] for seed in seeds]
                if diffs:
                    rows.append(
                        {"metric": metric, "setting": setting, "method": name, "baseline": baseline, "size": _size_label(size)}
                        | compare(diffs)
                    )
    return rows


def with_verdicts(rows: list[dict]) -> list[dict]:
    """``rows`` with Holm-adjusted t-test p-values over all of them (every comparison the report
    shows is one family) and a verdict each."""
    for row, adjusted in zip(rows, holm([r["p_t"] for r in rows])):
        row["p_holm"] = adjusted
        row["verdict"] = verdict(row)
    return rows


def _line_name(setting: str, method: str) -> str:
    return method + (f" [{setting}]" if setting else "")


def format_curves(curves_: Curves, metric: str) -> str:
    sizes = axis_order({size for lines in curves_.values() for line in lines.values() for size in line})
    header = ["method", *(_size_label(s) for s in sizes)]
    body = []
    for setting, lines in sorted(curves_.items()):
        for name in sorted(lines):
            cells = []
            for size in sizes:
                values = list(lines[name].get(size, {}).values())
                cells.append(
                    f"{statistics.fmean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f} (n={len(values)})"
                    if values
                    else ""
                )
            body.append([_line_name(setting, name), *cells])
    return "\n".join([f"{metric} by training-set size (mean ± std over seeds)", *columns([header, *body])])


COMPARISON_HEADER = ["n", "mean diff", "95% CI", "wins/ties/losses", "p (t)", "p (sign)", "p (Holm)", "verdict"]


def comparison_cells(row: dict) -> list[str]:
    """A comparison's figures as table cells, in the order of COMPARISON_HEADER."""
    return [
        str(row["n"]),
        f"{row['mean_diff']:+.4f}",
        f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]",
        f"{row['wins']}/{row['ties']}/{row['losses']}",
        f"{row['p_t']:.3f}",
        f"{row['p_sign']:.3f}",
        f"{row['p_holm']:.3f}",
        row["verdict"],
    ]


def format_comparisons(rows: list[dict], selection: str) -> str:
    """The paired comparisons, the split that chose nothing first: per size the mean difference, its
    95% interval, wins / ties / losses, the t-test's and the sign test's p-values, the Holm-adjusted
    one and the verdict."""
    if not rows:
        return ""
    header = ["comparison", "size", *COMPARISON_HEADER]
    text = [
        f"paired differences (the same seeds; 95% t interval, paired t-test, exact sign test without ties; "
        f"Holm's correction over all {len(rows)} comparisons below)"
    ]
    for metric in dict.fromkeys(r["metric"] for r in rows):
        role = "chose the checkpoints and any tuning" if metric.split("/")[0] == selection else "chose nothing"
        body = [
            [f"{_line_name(r['setting'], r['method'])} - {r['baseline']}", r["size"], *comparison_cells(r)]
            for r in rows
            if r["metric"] == metric
        ]
        text += ["", f"{metric} ({role})", *columns([header, *body])]
    return "\n".join(text)


CHOICE_KEYS = ("task.eval_splits", "task.main_metric")  # which split chose, and by which metric


def _logged(runs: list[Any], key: str) -> str | None:
    return next((r.data.params[key] for r in runs if key in r.data.params), None)


def choosing_split(runs: list[Any]) -> str:
    """The split that chose the checkpoints and any tuning: the first of ``task.eval_splits`` (keep-best
    and early stopping read it; ``selection`` with a held-out selection split)."""
    try:
        return ast.literal_eval(_logged(runs, "task.eval_splits") or "")[0]
    except (ValueError, SyntaxError, IndexError):
        return "validation"


def default_metric(runs: list[Any]) -> str:
    """The task's main metric on the split that chooses: what a tuning grid is chosen by, so the table
    lists settings in the order the choice reads them (not by the split kept untouched)."""
    return f"{choosing_split(runs)}/{_logged(runs, 'task.main_metric') or 'accuracy'}"


def compared_metrics(runs: list[Any], metric: str) -> tuple[list[str], str]:
    """The metric on every split that has it, the split that chose nothing first, and the split that
    chose the checkpoints (see :func:`choosing_split`)."""
    name = metric.split("/", 1)[-1]
    selection = choosing_split(runs)
    splits = {m.split("/", 1)[0] for r in runs for m in r.data.metrics if m.split("/", 1)[-1] == name and "/" in m} - {"train"}
    untouched = sorted(splits - {selection})
    return [f"{s}/{name}" for s in untouched] + ([f"{selection}/{name}"] if selection in splits else []), selection


def curve_plot(curves_: Curves, metric: str, path: Path, comparisons: list[dict] | None = None) -> Path:
    """The metric against the training-set size, one line per method and setting, error bars of one
    std; beside it, each method's paired difference from KD with its 95% interval (from
    ``comparisons`` of that metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {_line_name(setting, name): line for setting, group in curves_.items() for name, line in group.items()}
    sizes = axis_order({size for line in lines.values() for size in line})
    diffs = [r for r in comparisons or [] if r["metric"] == metric]
    fig, axes = plt.subplots(1, 2 if diffs else 1, figsize=(11.5 if diffs else 6.4, 4.0), squeeze=False)
    ax = axes[0][0]
    for offset, name in enumerate(sorted(lines)):
        xs = [i + 0.04 * offset for i, size in enumerate(sizes) if size in lines[name]]  # nudged so bars do not hide each other
        values = [list(lines[name][size].values()) for size in sizes if size in lines[name]]
        ax.errorbar(
            xs,
            [statistics.fmean(v) for v in values],
            yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in values],
            marker="o",
            capsize=3,
            label=name,
        )
    labels = [_size_label(s) for s in sizes]
    ax.set_xticks(range(len(sizes)), labels)
    ax.set_xlabel("training examples")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{metric} (mean ± std over seeds)")
    if diffs:
        ax = axes[0][1]
        names = sorted({(r["setting"], r["method"], r["baseline"]) for r in diffs})
        for offset, (setting, method, baseline) in enumerate(names):
            own = [r for r in diffs if (r["setting"], r["method"], r["baseline"]) == (setting, method, baseline)]
            xs = [labels.index(r["size"]) + 0.06 * offset for r in own]
            means = [r["mean_diff"] for r in own]
            errors = [[r["mean_diff"] - r["ci_low"] for r in own], [r["ci_high"] - r["mean_diff"] for r in own]]
            ax.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=f"{_line_name(setting, method)} - {baseline}")
        ax.axhline(0.0, color="grey", linewidth=1)
        ax.set_xticks(range(len(sizes)), labels)
        ax.set_xlabel("training examples")
        ax.set_ylabel(f"difference in {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("paired difference, mean and 95% interval")
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
    durations = [(r.data.tags.get(tags.LOSS, ""), seconds(r)) for r in runs]
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
    """Every run: its id, method, the params that vary (and which split chose, by which metric), the
    seed, its wall time and every final metric.
    Not its name: the command line's overrides say nothing the columns do not, and they can carry the
    paths of the machine that ran it (``task.data_dir=...``) into a file meant to be shared."""
    import csv

    keys = varying_keys(runs)
    keys += [k for k in CHOICE_KEYS if k not in keys and _logged(runs, k) is not None]  # a re-report knows which split chose
    metrics = sorted({m for r in runs for m in r.data.metrics})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", "method", *keys, REPLICATES, "seconds", *metrics])
        for r in sorted(runs, key=lambda r: r.info.start_time):
            duration = seconds(r)
            writer.writerow(
                [
                    r.info.run_id,
                    r.data.tags.get(tags.LOSS, ""),
                    *(r.data.params.get(k, "") for k in keys),
                    r.data.params.get(REPLICATES, ""),
                    "" if duration is None else f"{duration:.1f}",
                    *(r.data.metrics.get(m, "") for m in metrics),
                ]
            )
    return path


def runs_from_csv(path: Path) -> list[Any]:
    """Runs as :func:`export_csv` wrote them (run id, method, the varying params, the seed, seconds,
    the metrics), so a committed study is reported again without its MLflow store."""
    import csv
    from types import SimpleNamespace

    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if columns[:2] != ["run_id", "method"] or REPLICATES not in columns or "seconds" not in columns:
            raise ValueError(f"{path}: not a runs.csv of python -m diito.report (columns run_id, method, ..., seed, seconds, metrics)")
        params = columns[2 : columns.index("seconds")]
        metrics = columns[columns.index("seconds") + 1 :]
        runs = []
        for i, row in enumerate(reader):
            end = i * 10**6 + round(float(row["seconds"]) * 1000) if row["seconds"] else None
            runs.append(
                SimpleNamespace(
                    info=SimpleNamespace(run_id=row["run_id"], start_time=i * 10**6, end_time=end),
                    data=SimpleNamespace(
                        params={k: row[k] for k in params if row[k] != ""},
                        metrics={k: float(row[k]) for k in metrics if row[k] != ""},
                        tags={tags.LOSS: row["method"]},
                    ),
                )
            )
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diito.report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "targets",
        nargs="+",
        metavar="target",
        help="experiment name, sweep id (tag diito.sweep_id), the sweep's parent run id, or a runs.csv this command exported; "
        "several are reported as one (a KD sweep and a DIITO sweep, say)",
    )
    parser.add_argument(
        "--metric", help="what the table ranks by (default: the task's main metric on the split that chose, e.g. selection/accuracy)"
    )
    parser.add_argument("--x", help="heatmap columns (default: the first varying key)")
    parser.add_argument("--y", help="heatmap rows (default: the second varying key)")
    parser.add_argument("--size", default=SIZE, help=f"the key of the learning curve, drawn when it varies (default {SIZE})")
    parser.add_argument("--out", default=".", help="folder for the table, the heatmap, the learning curve and runs.csv")
    parser.add_argument(
        "--tracking-uri",
        help="the store (default: the one jobs log to: MLFLOW_TRACKING_URI, else the project folder's mlflow.db, DIITO_HOME)",
    )
    args = parser.parse_args(argv)

    runs, parents, seen, store = [], [], set(), None
    try:
        for target in args.targets:
            if target.endswith(".csv"):
                found, parent = runs_from_csv(Path(target)), None
            else:
                store = store or tracking.settings(args.tracking_uri)  # where jobs log, with their retries
                found, parent = tracking.find_student_runs(store, target)
            if not found:
                raise LookupError(f"no finished runs for {target!r}")
            runs += [r for r in found if r.info.run_id not in seen]  # a run two sweeps share is counted once
            seen |= {r.info.run_id for r in found}
            parents.append(parent)
    except (LookupError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    parent_id = parents[0] if len(parents) == 1 else None  # the report is logged to the one sweep it covers
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = []

    metric = args.metric or default_metric(runs)
    # the paired comparisons against KD, the split that chose nothing first
    metrics, selection = compared_metrics(runs, metric)
    by_metric = {m: curves(runs, m, args.size) for m in metrics or [metric]}
    methods = {r.data.tags.get(tags.LOSS, "?") for r in runs}  # a grid of one method compares no methods
    comparisons = with_verdicts([row for m, lines in by_metric.items() for row in paired(lines, m)]) if len(methods) > 1 else []
    if comparisons:
        text = format_comparisons(comparisons, selection)
        print(text + "\n")
        (out / "comparisons.txt").write_text(text + "\n")
        files.append(out / "comparisons.txt")

    keys, rows = table(runs, metric)
    text = format_table(keys, rows, metric) + "\n\n" + wall_time(runs)
    print(text)
    (out / "report.txt").write_text(text + "\n")
    files.append(out / "report.txt")
    # a study over sizes: sizes against the first other varying key, unless told otherwise
    axes = [k for k in (args.x, args.y) if k] or ([args.size, *[k for k in keys if k != args.size][:1]] if args.size in keys else keys[:2])
    if len(axes) == 2:
        apart = [k for k in keys if k not in axes and k.startswith(APART)]
        groups = sorted({tuple(row[k] for k in apart) for row in rows}, key=str)
        if len(groups) > 1:
            print(f"these runs differ in {', '.join(apart)}: one heatmap for each, never averaged into one cell")
        for i, group in enumerate(groups, 1):
            name = "heatmap.png" if len(groups) == 1 else f"heatmap-{i}.png"
            part = [row for row in rows if tuple(row[k] for k in apart) == group]
            title = ", ".join(f"{k}={v}" for k, v in zip(apart, group))
            files.append(heatmap(part, axes[0], axes[1], metric, out / name, title))
            print(f"heatmap: {files[-1]}" + (f" ({title})" if title else ""))
    if not all(target.endswith(".csv") for target in args.targets):
        files.append(export_csv(runs, out / "runs.csv"))
    if args.size in keys:  # a learning curve per split, one line per method; drawn for the split that chose nothing
        curve_text = "\n\n".join(format_curves(lines, m) for m, lines in by_metric.items())
        print(curve_text)
        (out / "by_size.txt").write_text(curve_text + "\n")
        lead = next(iter(by_metric))
        files += [out / "by_size.txt", curve_plot(by_metric[lead], lead, out / "by_size.png", comparisons)]
        print(f"learning curve: {files[-1]}")
    if parent_id is not None:
        tracking.log_files(store, parent_id, files, "report")
        print(f"logged to the sweep's parent run {parent_id}")


if __name__ == "__main__":
    main()
