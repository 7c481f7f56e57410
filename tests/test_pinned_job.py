"""A small fixed job (tiny teacher, 30 steps, DIITO, patience and causal cosine on), pinned to its final weights and metrics.

A change that should not change results (a refactoring, a speed-up) must leave this job bit-identical.
Float results depend on the CPU's instruction set and torch's kernels, so the exact digest is only
demanded on a machine with the same numerics signature as the one that pinned it; elsewhere every
weight tensor's sum and norm and every metric must agree to 1e-4.

    python -m tests.test_pinned_job     # re-pin (only after a change meant to change results)
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from tests.conftest import TIMINGS

PIN = Path(__file__).parent / "data" / "pinned_job.json"
OVERRIDES = [
    "teacher=tiny",
    "teacher.recipe.max_steps=80",
    "teacher.recipe.batch_size=32",
    "teacher.recipe.max_train_examples=null",
    "teacher.recipe.max_eval_examples=128",
    "teacher.recipe.precision=fp32",
    "trainer=debug",
    "trainer.max_steps=30",
    "trainer.batch_size=16",
    "trainer.max_train_examples=256",
    "trainer.max_eval_examples=128",
    "trainer.save_every=10",
    "trainer.eval_every=10",
    "trainer.log_every=5",
    "trainer.precision=fp32",
    "trainer.num_threads=1",
    "optim.lr=1e-3",
    "loss=diito",
    "loss.beta=0.5",
    "loss.cosine=0.5",
    "seed=3",
]


def numerics_signature() -> str:
    """What float results depend on besides the code: torch's version and the CPU's vector units."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    units = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma"})
    return f"torch {torch.__version__}, {platform.machine()}, {' '.join(units)}"


def run_pinned_job(home: Path) -> dict:
    """Run the job in ``home`` and return its weights' digest and summary, and its metric histories."""
    import os

    from diito import job
    from tests.conftest import compose_config

    os.environ["DIITO_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    job.run(compose_config(OVERRIDES), output_dir=home / "out")
    weights = load_file(home / "out" / "student" / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode() + weights[name].numpy().tobytes())
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    (run,) = [
        r for r in client.search_runs([e.experiment_id for e in client.search_experiments()]) if r.data.tags.get("diito.role") == "student"
    ]
    histories = {
        key: [[m.step, m.value] for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))]
        for key in sorted(run.data.metrics)
        if not key.startswith(TIMINGS)
    }
    return {
        "signature": numerics_signature(),
        "weights_sha256": digest.hexdigest(),
        "weights": {name: [float(t.double().sum()), float(t.double().norm())] for name, t in sorted(weights.items())},
        "metrics": histories,
    }


def test_pinned_job_is_unchanged(home):
    pinned = json.loads(PIN.read_text())
    got = run_pinned_job(home)
    assert got["weights"].keys() == pinned["weights"].keys() and got["metrics"].keys() == pinned["metrics"].keys()
    if got["signature"] == pinned["signature"]:
        assert got["weights_sha256"] == pinned["weights_sha256"], "the pinned job's final weights changed"
        assert got["metrics"] == pinned["metrics"], "the pinned job's metrics changed"
        return
    for name, (total, norm) in pinned["weights"].items():
        assert got["weights"][name] == pytest.approx([total, norm], rel=1e-4, abs=1e-4), name
    for key, history in pinned["metrics"].items():
        assert [s for s, _ in got["metrics"][key]] == [s for s, _ in history], key
        assert [v for _, v in got["metrics"][key]] == pytest.approx([v for _, v in history], rel=1e-4, abs=1e-4), key


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        PIN.parent.mkdir(exist_ok=True)
        PIN.write_text(json.dumps(run_pinned_job(Path(folder)), indent=1) + "\n")
    print(f"pinned {PIN}", file=sys.stderr)
