"""The benchmark's figures are the ratios of what it measured (timings are never asserted: machines are noisy)."""

import json

import pytest
import torch

from diito.bench import TARGETS, main, report


def test_bench_figures_are_the_ratios_of_its_measurements(capsys):
    main(["--json", "--steps", "2", "--rounds", "1"])
    results = json.loads(capsys.readouterr().out)
    d = results["details"]
    ms, memory = d["ms_per_step"], d["peak_step_memory_mb"]
    assert results["diito_over_kd"] == pytest.approx(ms["diito"] / ms["kd"])
    assert results["reference_over_fast"] == pytest.approx(ms["reference"] / ms["diito"])
    assert results["separate_over_fast"] == pytest.approx(ms["separate"] / ms["diito"])
    assert results["dynamic_over_fixed"] == pytest.approx(ms["diito_fixed"] / ms["diito"])
    assert results["diito_over_kd_memory"] == pytest.approx(memory["diito"] / memory["kd"])
    gflop_per_s = d["diito_gflop_per_step"] / (ms["diito"] / 1000)
    assert results["flops_utilisation"] == pytest.approx(gflop_per_s / d["matmul_peak_gflops"])
    assert d["real_tokens_fraction_fixed"] < 0.5 < 0.9 < d["real_tokens_fraction_dynamic"] <= 1.0  # length-grouped batches barely pad
    assert d["diito_gflop_per_step"] > 10  # a 3-block MiniLM student with its teacher on 32 sentences
    lines = report(results).splitlines()
    for name, (target, higher) in TARGETS.items():
        (line,) = [line for line in lines if line.startswith(name + " ")]
        met = results[name] >= target if higher else results[name] <= target
        assert f"{results[name]:.2f}" in line and line.endswith("ok" if met else "MISSED")


def test_the_ranks_figure_is_the_ratio_of_its_step_times(capsys):
    main(["--json", "--ranks", "2", "--steps", "1", "--rounds", "1"])
    results = json.loads(capsys.readouterr().out)
    ms = results["details"]["ms_per_step"]
    assert set(ms) == {"1 process, grad_accum=2", "2 ranks"} and all(v > 0 for v in ms.values())
    assert results["ranks_over_accum"] == pytest.approx(ms["2 ranks"] / ms["1 process, grad_accum=2"])
    assert results["details"]["ranks"] == 2 and results["details"]["steps"] == 1


def test_the_jobs_figure_is_the_ratio_of_two_real_jobs_training_seconds(home, capsys):
    from diito.bench import measure_jobs

    results = measure_jobs(
        [
            "teacher=tiny",
            "trainer=debug",
            "trainer.max_train_examples=32",
            "trainer.min_steps=12",
            "trainer.max_steps=null",
            "trainer.epochs=1",
            "trainer.save_every=null",
        ],
        1,
        torch.device("cpu"),
        "fp32",
    )
    assert "result: " not in capsys.readouterr().out  # the jobs' closing blocks stay out of --json's one object
    seconds = results["job_details"]["seconds"]
    assert results["job_diito_over_kd"] == pytest.approx(seconds["diito"]["train_seconds"] / seconds["kd"]["train_seconds"])
    for parts in seconds.values():
        assert parts["steps"] == 12  # 4 batches an epoch stretched to 12 steps: evaluated once, at the end
        assert 0 < parts["steps_seconds"] + parts["evaluation_seconds"] + parts["checkpoints_seconds"] <= parts["train_seconds"]
    lines = report(
        {
            **dict.fromkeys(TARGETS, 1.0),
            "diito_over_kd": results["job_diito_over_kd"],
            "separate_over_fast": 1.0,
            "details": {
                "ms_per_step": {},
                "peak_step_memory_mb": {},
                "diito_gflop_per_step": 1.0,
                "matmul_peak_gflops": 1.0,
                "device": "cpu",
                "precision": "fp32",
                "threads": 1,
                "steps": 1,
                "data": "x",
                "batch_size": 1,
                "rounds": 1,
            },
            **results,
        }
    ).splitlines()
    (line,) = [line for line in lines if line.startswith("job_diito_over_kd ")]
    assert line.endswith("ok")  # the same figure on both sides of the comparison


def test_the_cache_figures_are_the_ratios_of_their_step_times(capsys):
    main(["--json", "--cached", "--steps", "1", "--rounds", "1"])
    results = json.loads(capsys.readouterr().out)
    ms = results["details"]["ms_per_step"]
    assert set(ms) == {"kd", "kd_cached", "diito", "diito_cached"} and all(v > 0 for v in ms.values())
    assert results["kd_cached_over_live"] == pytest.approx(ms["kd_cached"] / ms["kd"])
    assert results["diito_cached_over_live"] == pytest.approx(ms["diito_cached"] / ms["diito"])
