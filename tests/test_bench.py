"""The benchmark runs and reports every figure (timings are never asserted: machines are noisy)."""

import json
import math

from diito.bench import TARGETS, main, report


def test_bench_json_has_every_figure(capsys):
    main(["--json", "--steps", "2", "--rounds", "1"])
    results = json.loads(capsys.readouterr().out)
    assert set(TARGETS) <= set(results)
    assert all(math.isfinite(results[k]) and results[k] > 0 for k in TARGETS)
    d = results["details"]
    assert d["real_tokens_fraction_fixed"] < d["real_tokens_fraction_dynamic"] <= 1.0
    assert d["diito_gflop_per_step"] > 0
    text = report(results)
    assert all(name in text for name in TARGETS)
