#!/usr/bin/env bash
# The speed figures on a CUDA machine that has PyTorch and transformers but not the rest of the project
# and no network: installs what it lacks from wheels carried along, then runs the benchmark (its
# figures, and the teacher-output cache's) and a short default job on the GPU, twice (the second reads
# the cached teacher and its cached outputs).
#
#   scripts/gpu_check.sh --download [3.11]   # where the network is: the wheels into wheels/ (torch, its CUDA
#                                            # libraries and transformers left out), for that Python version
#   scripts/gpu_check.sh                     # on the GPU machine, in the project folder; figures go to $OUT
#                                            # (or gpu_check/ when OUT is not set)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-wheels}
PY=$(command -v python || command -v python3)  # some CUDA images have only python3
# The project's dependencies (pyproject.toml) less torch and transformers, which the machine has.
DEPS=$("$PY" - <<'PY'
import re  # tomllib needs Python 3.11; the project runs on 3.10
deps = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)^\]", open("pyproject.toml").read(), re.S | re.M).group(1))
print(" ".join(d for d in deps if re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() not in {"torch", "transformers"}))
PY
)

if [[ "${1:-}" == "--download" ]]; then
    version=${2:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
    # shellcheck disable=SC2086
    "$PY" -m pip download -d "$WHEELS" --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        --python-version "$version" $DEPS
    rm -f "$WHEELS"/torch-* "$WHEELS"/nvidia_* "$WHEELS"/triton-* "$WHEELS"/transformers-*  # the machine's own
    du -sh "$WHEELS"
    exit 0
fi

OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/gpu_check.log") 2>&1
"$PY" -c 'import torch, transformers; assert torch.cuda.is_available(), "no CUDA device"; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
# What is already installed is kept: only the wheels of distributions the machine lacks are installed, without
# the resolver (the machine has no network, and its own versions of the rest are the ones to keep).
missing=$("$PY" - "$WHEELS" <<'PY'
import pathlib, re, sys
from importlib import metadata
norm = lambda name: re.sub(r"[-_.]+", "-", name.lower())
have = {norm(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
print(" ".join(str(w) for w in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")) if norm(w.name.split("-")[0]) not in have))
PY
)
# shellcheck disable=SC2086
[[ -z "$missing" ]] || "$PY" -m pip install --no-index --no-deps $missing
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 DIITO_HOME=$OUT/home
mkdir -p "$DIITO_HOME"

"$PY" -m diito.bench --device cuda --json --steps 16 --rounds 5 > "$OUT/bench.json"
"$PY" -m diito.bench --device cuda --cached --json --steps 16 --rounds 5 > "$OUT/bench_cached.json"

for run in first second; do  # the first fine-tunes the teacher and computes its outputs; the second reads both
    start=$(date +%s.%N)
    "$PY" run.py trainer.device=cuda trainer.max_steps=100 trainer.progress=false hydra.run.dir="$OUT/job_$run" \
        2>&1 | tee "$OUT/job_$run.log" | grep -E "teacher|error|student: final" || true
    "$PY" -c "print('job_$run seconds', round($(date +%s.%N) - $start, 1))" | tee -a "$OUT/times.txt"
done
"$PY" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
bench, cached = (json.load(open(f"{out}/{name}.json")) for name in ("bench", "bench_cached"))
figures = {k: v for k, v in bench.items() if k != "details"} | {k: v for k, v in cached.items() if k != "details"}
figures["ms_per_step"] = bench["details"]["ms_per_step"] | {f"cache/{k}": v for k, v in cached["details"]["ms_per_step"].items()}
figures["peak_step_memory_mb"] = bench["details"]["peak_step_memory_mb"]
json.dump(figures, open(f"{out}/figures.json", "w"), indent=1)
print(json.dumps(figures, indent=1))
PY
