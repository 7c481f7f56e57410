"""The alignment map of a trained student: how well each student block's interventions follow each
teacher block's.

    python -m diito.analyze <run id> [<run id> ...] [--pairs 256] [--dims 0:192]

For every (student block i, teacher block j) it takes fixed, seeded pairs of validation examples
(base, source), swaps the source's block output into the base at the same positions in both models
(block i of the student, block j of the teacher; the interchange settings and site machinery of
training), and counts how often the student's counterfactual prediction is the teacher's: the
interchange-intervention accuracy (IIA). A bright diagonal band is a student whose causal structure
follows its alignment; KD and DIITO students side by side show what the DIITO term changed. Beside
the cells: the teacher's efficacy per block, the base agreement (no swap), and each mapping entry
with its blocks swapped jointly as in training; several runs of one method are drawn as their mean
with each cell's spread. The map
(``alignment/iia_map.json``, ``alignment/iia_map.png``) is logged to each run; with several runs, one
figure holds them all, on the same pairs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from diito import tags, tracking
from diito.batching import Encoded, Prepared, make_loader, model_inputs
from diito.console import columns
from diito.intervention import (
    Interchange,
    InterchangeConfig,
    MappingConfig,
    MappingEntry,
    Shape,
    Site,
    block_list,
    build_mapping,
    counterfactual,
    sample_interchange,
)
from diito.models import load_finetuned, load_tokenizer, num_layers
from diito.report import COMPARISON_HEADER, compare, comparison_cells, with_verdicts  # the report's statistics
from diito.sources import load_task
from diito.tasks import TaskSpec


@dataclass
class AlignmentMap:
    iia: np.ndarray  # [student site, teacher site]
    efficacy: np.ndarray  # [teacher site]: how often the intervention changes the teacher's prediction
    student_sites: list[Site]
    teacher_sites: list[Site]
    pairs: int
    agreement: float  # how often student and teacher predict the same class with no swap at all
    mapped: dict[str, float]  # per mapping entry, its blocks swapped jointly as in training: IIA
    mapped_efficacy: dict[str, float]  # per mapping entry: how often the joint swap changes the teacher's prediction
    iia_std: np.ndarray | None = None  # the spread over runs, for a map that is several runs' mean
    runs: int = 1

    def to_json(self) -> dict:
        out = {
            "iia": self.iia.round(6).tolist(),
            "teacher_efficacy": self.efficacy.round(6).tolist(),
            "pairs": self.pairs,
            "base_agreement": round(self.agreement, 6),
            "mapped_iia": self.mapped,
            "mapped_teacher_efficacy": self.mapped_efficacy,
            "student_sites": [str(s) for s in self.student_sites],
            "teacher_sites": [str(s) for s in self.teacher_sites],
            "runs": self.runs,
        }
        return out | ({"iia_std": self.iia_std.round(6).tolist()} if self.iia_std is not None else {})

    @classmethod
    def mean(cls, maps: list[AlignmentMap]) -> AlignmentMap:
        """Several runs' maps (the same pairs and sites) as their mean, with the spread of each cell
        (sample std over runs) beside it."""
        first = maps[0]
        iia = np.stack([m.iia for m in maps])
        keys = list(first.mapped)
        return cls(
            iia.mean(0),
            np.stack([m.efficacy for m in maps]).mean(0),
            first.student_sites,
            first.teacher_sites,
            first.pairs,
            float(np.mean([m.agreement for m in maps])),
            {k: float(np.mean([m.mapped[k] for m in maps])) for k in keys},
            {k: float(np.mean([m.mapped_efficacy[k] for m in maps])) for k in keys},
            iia.std(0, ddof=1) if len(maps) > 1 else None,
            len(maps),
        )


def pair_by_seed(runs: list[tuple[str, int | None, AlignmentMap]]) -> dict[str, dict[int | None, AlignmentMap]]:
    """(method, seed, map) of each run as each method's maps by seed; a method with two runs of one
    seed cannot be paired by seed (which of them would it be?), and says so."""
    paired: dict[str, dict[int | None, AlignmentMap]] = {}
    for method, seed, m in runs:
        if seed in paired.setdefault(method, {}):
            raise ValueError(f"two {method} runs of seed {seed}: runs are paired by seed, one per method and seed")
        paired[method][seed] = m
    return paired


def compare_methods(by_seed: dict[str, dict[int | None, AlignmentMap]]) -> list[dict]:
    """Two methods' maps paired by seed (KD, or the first method, the baseline): per seed the
    difference in base agreement, in each mapping entry's IIA (its blocks swapped jointly), and in
    that IIA beyond the base agreement, which is the part a swap explains (a student that agrees more
    with its teacher scores a higher IIA on every pair the swap leaves unchanged). Each as the report
    states a paired comparison (interval, t-test, sign test, ties apart), Holm-adjusted over these rows."""
    names = sorted(by_seed)
    baseline = next((n for n in names if n.startswith("kd")), names[0])
    (other,) = (n for n in names if n != baseline)
    seeds = sorted((s for s in set(by_seed[baseline]) & set(by_seed[other]) if s is not None), key=int)
    pairs = [(by_seed[other][s], by_seed[baseline][s]) for s in seeds]
    if not pairs:
        return []
    quantities: dict[str, Callable[[AlignmentMap], float]] = {"base agreement (no swap)": lambda m: m.agreement}
    for entry in next(iter(by_seed[baseline].values())).mapped:
        quantities[f"mapped {entry}: IIA"] = lambda m, e=entry: m.mapped[e]
        quantities[f"mapped {entry}: IIA - base agreement"] = lambda m, e=entry: m.mapped[e] - m.agreement
    rows = [
        {"quantity": name, "method": other, "baseline": baseline} | compare([value(a) - value(b) for a, b in pairs])
        for name, value in quantities.items()
    ]
    return with_verdicts(rows)


def format_comparisons(rows: list[dict]) -> str:
    if not rows:
        return "no seed was run by both methods: nothing to compare"
    header = ["quantity", *COMPARISON_HEADER]
    body = [[r["quantity"], *comparison_cells(r)] for r in rows]
    title = (
        f"{rows[0]['method']} - {rows[0]['baseline']}, paired by seed (95% t interval, paired t-test, exact sign test "
        f"without ties; Holm's correction over the {len(rows)} rows)"
    )
    return "\n".join([title, *columns([header, *body])])


def block_sites(model: torch.nn.Module, dims: tuple[int, int] | None = None) -> list[Site]:
    """One site per block: its whole output, or the slice ``dims`` of it."""
    return [Site(layer, dims) for layer in range(num_layers(model.config))]


def entry_name(entry: MappingEntry) -> str:
    return f"{'+'.join(map(str, entry.student))} <-> {'+'.join(map(str, entry.teacher))}"


@torch.no_grad()
def alignment_map(
    student,
    teacher,
    data: Encoded,
    pad_token_id: int,
    interchange: InterchangeConfig,
    seed: int,
    batch_size: int,
    device: torch.device,
    dims: tuple[int, int] | None = None,
    mapping: list[MappingEntry] | None = None,
) -> AlignmentMap:
    """IIA of every (student site, teacher site) on the pairs of ``data`` drawn from ``seed``: every
    cell sees the same pairs and positions. With ``mapping``, also each entry's IIA with its sites
    swapped jointly on each side, as training swaps them."""
    student, teacher = student.eval(), teacher.eval()
    student_sites, teacher_sites = block_sites(student, dims), block_sites(teacher, dims)
    mapping = mapping or []
    loader = make_loader(data, batch_size, shuffle=False, seed=0, length_grouped=False, pad_token_id=pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    agree = np.zeros((len(student_sites), len(teacher_sites)))
    changed = np.zeros(len(teacher_sites))
    joint, joint_changed = np.zeros(len(mapping)), np.zeros(len(mapping))
    same, count = 0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in model_inputs(batch).items()}
        x = sample_interchange(
            batch["attention_mask"].sum(1).cpu(),
            interchange.interchange_prop,
            interchange.interchange_mode,
            interchange.interchange_min_token,
            interchange.interchange_max_token,
            interchange.pairing == "derangement",
            generator,
        ).to(device)
        teacher_base, teacher_states = _base(teacher, batch)
        student_base, student_states = _base(student, batch)
        teacher_cf = _counterfactual_classes(teacher, batch, teacher_states, x, [(site,) for site in teacher_sites])
        student_cf = _counterfactual_classes(student, batch, student_states, x, [(site,) for site in student_sites])
        agree += (student_cf[:, None, :] == teacher_cf[None, :, :]).sum(-1).cpu().numpy()
        changed += (teacher_cf != teacher_base[None, :]).sum(-1).cpu().numpy()
        if mapping:
            teacher_joint = _counterfactual_classes(teacher, batch, teacher_states, x, [e.teacher for e in mapping])
            student_joint = _counterfactual_classes(student, batch, student_states, x, [e.student for e in mapping])
            joint += (student_joint == teacher_joint).sum(-1).cpu().numpy()
            joint_changed += (teacher_joint != teacher_base[None, :]).sum(-1).cpu().numpy()
        same += int((student_base == teacher_base).sum())
        count += len(batch["input_ids"])
    names = [entry_name(e) for e in mapping]
    return AlignmentMap(
        agree / count,
        changed / count,
        student_sites,
        teacher_sites,
        count,
        same / count,
        dict(zip(names, (joint / count).round(6).tolist())),
        dict(zip(names, (joint_changed / count).round(6).tolist())),
    )


def _base(model, batch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The predicted class of every example with no swap, and the block outputs a counterfactual starts from."""
    out = model(**batch, output_hidden_states=True)
    return out.logits.argmax(-1), out.hidden_states


def _counterfactual_classes(model, batch, hidden_states, x: Interchange, site_groups: list[tuple[Site, ...]]) -> torch.Tensor:
    """The predicted class of every pair after intervening at each group of sites at once ([group, pair])."""
    return torch.stack([counterfactual(model, batch, hidden_states, x, sites).logits.argmax(-1) for sites in site_groups])


def draw(maps: dict[str, AlignmentMap], path: Path) -> Path:
    """One heatmap per map, side by side, on one colour scale; a mean of several runs shows each
    cell's spread under it, and every panel gives the teacher's efficacy per block (how often a swap
    there changes its answer at all) and the base agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(1.2 + 3.4 * len(maps), 3.8), squeeze=False)
    for ax, (title, m) in zip(axes[0], maps.items()):
        image = ax.imshow(m.iia, vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(m.teacher_sites)), [f"{s}\n{e:.2f}" for s, e in zip(m.teacher_sites, m.efficacy)], fontsize=8)
        ax.set_yticks(range(len(m.student_sites)), [str(s) for s in m.student_sites])
        ax.set_xlabel("teacher block (under it: the teacher's efficacy)", fontsize=8)
        ax.set_ylabel("student block")
        runs = f"mean of {m.runs} runs, " if m.runs > 1 else ""
        ax.set_title(f"{title}\n{runs}base agreement {m.agreement:.2f}", fontsize=9)
        for (i, j), value in np.ndenumerate(m.iia):
            text = f"{value:.2f}" + (f"\n±{m.iia_std[i, j]:.2f}" if m.iia_std is not None else "")
            ax.text(
                j, i, text, ha="center", va="center", fontsize=6 if m.iia_std is not None else 7, color="white" if value < 0.8 else "black"
            )
    fig.colorbar(image, ax=axes[0].tolist(), label=f"IIA ({next(iter(maps.values())).pairs} pairs)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


@dataclass
class TrainedRun:
    """What the analysis needs of a finished student run: its config, student, teacher and name."""

    run_id: str
    name: str
    method: str  # the run's loss tag: kd, diito, ...
    task: TaskSpec
    interchange: InterchangeConfig
    student_dir: Path
    tokenizer_dir: Path
    teacher_dir: Path
    mapping: MappingConfig | None  # the run's alignment (a KD run's too: it names the blocks a DIITO run would align)
    seed: int | None = None  # pairs the runs of two methods (the same seed: the same training sample)


def trained_run(store: tracking.TrackingConfig, run_id: str, folder: Path) -> TrainedRun:
    """Only the task and the interchange settings are read back from the run's config, so runs
    logged by earlier versions of the schema can be analysed too."""
    info = tracking.run_record(store, run_id)
    logged = OmegaConf.to_container(OmegaConf.load(tracking.download(store, run_id, "config.yaml", folder)))
    task = TaskSpec.model_validate(logged["task"])
    settings = logged.get("intervention") or logged.get("loss", {})  # runs logged before the intervention group: under loss
    interchange = InterchangeConfig(**{k: v for k, v in settings.items() if k in InterchangeConfig.model_fields})
    teacher_dir = Path(info.data.tags.get(tags.TEACHER_PATH, ""))
    if tags.TEACHER_PATH not in info.data.tags or not teacher_dir.is_dir():
        raise LookupError(f"run {run_id}: its teacher {str(teacher_dir) or '(no diito.teacher_path tag)'} is not on this machine")
    try:
        student_dir = tracking.download(store, run_id, "student", folder)
    except Exception as e:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
        raise LookupError(f"run {run_id} has no logged student (tracking.log_model was off?): {e}") from None
    if (teacher_dir / "model").is_dir():  # a teacher cache entry keeps the model beside its record
        teacher_dir = teacher_dir / "model"
    tokenizer_dir = student_dir
    if (student_dir / "MLmodel").exists():  # an MLflow model: the Hugging Face folder and the tokenizer are inside
        student_dir, tokenizer_dir = student_dir / "model", student_dir / "components" / "tokenizer"
    mapping = MappingConfig(**logged["mapping"]) if isinstance(logged.get("mapping"), dict) else None
    return TrainedRun(
        run_id,
        info.info.run_name or run_id,
        info.data.tags.get(tags.LOSS, "?"),
        task,
        interchange,
        student_dir,
        tokenizer_dir,
        teacher_dir,
        mapping,
        logged.get("seed"),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diito.analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="finished student runs (MLflow run ids)")
    parser.add_argument("--pairs", type=int, default=256, help="validation pairs (default 256: the first examples of the split)")
    parser.add_argument("--seed", type=int, default=0, help="draws the pairs and positions (default 0)")
    parser.add_argument("--dims", help="intervene on a slice of each block's output, START:STOP (default: all of it)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="alignment", help="folder for the figure and the maps (default ./alignment)")
    parser.add_argument(
        "--tracking-uri",
        help="the store (default: the one jobs log to: MLFLOW_TRACKING_URI, else the project folder's mlflow.db, DIITO_HOME)",
    )
    args = parser.parse_args(argv)
    dims = tuple(int(v) for v in args.dims.split(":")) if args.dims else None
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    store = tracking.settings(args.tracking_uri)  # where jobs log, with their retries
    maps: dict[str, AlignmentMap] = {}
    by_method: dict[str, list[AlignmentMap]] = {}
    seeded: list[tuple[str, int | None, AlignmentMap]] = []
    with tempfile.TemporaryDirectory() as folder:
        for run_id in args.runs:
            run = trained_run(store, run_id, Path(folder) / run_id)
            tokenizer = load_tokenizer(str(run.tokenizer_dir))
            data = Prepared.from_task(load_task(run.task), tokenizer)
            split = data.encoded[run.task.eval_splits[0]].head(args.pairs)
            teacher, student = load_finetuned(run.teacher_dir).to(device), load_finetuned(run.student_dir).to(device)
            block_list(student)  # a clear error for a model family without known blocks
            mapping = _mapping(run, teacher, student, dims)
            maps[f"{run.method} (run {run_id[:8]})"] = m = alignment_map(
                student, teacher, split, data.pad_token_id, run.interchange, args.seed, args.batch_size, device, dims, mapping
            )
            by_method.setdefault(run.method, []).append(m)
            seeded.append((run.method, run.seed, m))
            print(f"{run_id} ({run.method}): IIA by student block (rows) and teacher block (columns), {m.pairs} pairs")
            print(_describe(m))
            (out / f"{run_id}.json").write_text(json.dumps(m.to_json(), indent=1))
    if any(len(group) > 1 for group in by_method.values()):  # several runs of a method: their mean and spread per cell
        maps = {}
        for method, group in by_method.items():
            maps[method] = m = AlignmentMap.mean(group)
            print(f"{method}: mean of {len(group)} runs (± the cells' std over runs)")
            print(_describe(m))
            (out / f"{method}_mean.json").write_text(json.dumps(m.to_json(), indent=1))
    if len(by_method) == 2:  # two methods over the same seeds: what the difference between them supports
        try:
            text = format_comparisons(compare_methods(pair_by_seed(seeded)))
        except ValueError as e:
            text = f"not compared: {e}"
        print(text)
        (out / "comparisons.txt").write_text(text + "\n")
    figure = draw(maps, out / "iia_map.png")
    for run_id in args.runs:  # each run keeps its own map and the figure it was drawn in
        (out / "iia_map.json").write_text((out / f"{run_id}.json").read_text())
        tracking.log_files(store, run_id, [figure, out / "iia_map.json"], "alignment")
    print(f"wrote {figure} and logged it to {len(args.runs)} run(s) under alignment/")


def _mapping(run: TrainedRun, teacher, student, dims: tuple[int, int] | None) -> list[MappingEntry]:
    """The run's mapping entries, their block-output sites restricted to ``dims`` like the
    single-block cells (attention-head sites stay as they are); none when the run logged no mapping,
    or one that does not fit these models."""
    if run.mapping is None:
        return []
    try:
        entries = build_mapping(run.mapping, Shape.of(teacher.config), Shape.of(student.config))
    except ValueError as e:
        print(f"run {run.run_id}: its mapping is left out ({e})")
        return []
    if dims is None:
        return entries
    restrict = lambda sites: tuple(s if s.heads else Site(s.layer, dims) for s in sites)  # noqa: E731
    return [MappingEntry(restrict(e.student), restrict(e.teacher)) for e in entries]


def _describe(m: AlignmentMap) -> str:
    rows = [
        "  " + " ".join(f"{v:.3f}" + (f"±{m.iia_std[i, j]:.3f}" if m.iia_std is not None else "") for j, v in enumerate(row))
        for i, row in enumerate(m.iia)
    ]
    rows.append("  teacher efficacy by block: " + " ".join(f"{v:.3f}" for v in m.efficacy))
    rows.append(f"  base agreement (no swap): {m.agreement:.3f}")
    rows += [
        f"  mapped {name} (swapped jointly): IIA {iia:.3f}, teacher efficacy {m.mapped_efficacy[name]:.3f}"
        for name, iia in m.mapped.items()
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
