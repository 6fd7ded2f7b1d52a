#!/usr/bin/env bash
# The GPU check, in one go, under 8 minutes on one CUDA GPU:
#   1. the tests that have a device path, on CUDA   (pytest -m device --device cuda)
#   2. bench_train_step.py --net vgg16 --device cuda: FRCN and OHEM s/iter, peak memory ratio,
#      ratio to ideal; again with TRAIN.OHEM_READONLY_DTYPE bfloat16
#   3. bench_mining.py --device cuda                 (2 images x 2000 RoIs, NMS on)
#   4. gpu_train_check.py: 200 iterations of VGG16 OHEM training on synthetic full-size images
# then one summary table. Each step has a time budget; the exit status is non-zero when a step
# failed or ran out of time. Without CUDA it stops at once with a message and exit status 2.
#
#   bash scripts/gpu_check.sh              (PYTHON=... picks the interpreter; logs in $GPU_CHECK_OUT
#                                           or a temporary directory)
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO" || exit 2

if ! version="$("$PY" -c 'import sys, torch; print(torch.__version__)
sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null)"; then
    echo "gpu_check: CUDA is not available on this machine (torch ${version:-not importable}," \
         "torch.cuda.is_available() is False); this check needs an NVIDIA GPU and a CUDA build" \
         "of torch. Nothing was run." >&2
    exit 2
fi

OUT="${GPU_CHECK_OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$OUT"
START=$SECONDS
DEADLINE=$((START + 470))  # 8 minutes, less a margin for the summary
STATUS=0

# run NAME BUDGET_SECONDS CMD...: the command under a timeout (its budget, or what is left)
run() {
    local name="$1" budget="$2"
    shift 2
    local left=$((DEADLINE - SECONDS))
    ((budget > left)) && budget=$left
    if ((budget < 10)); then
        echo "skipped (no time left)" >"$OUT/$name.status"
        STATUS=1
        return
    fi
    echo "== $name (up to ${budget}s): $*"
    local t0=$SECONDS
    timeout -k 10 "$budget" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local dt=$((SECONDS - t0))
    tail -n 4 "$OUT/$name.log" | sed 's/^/   /'
    if ((rc == 124 || rc == 137)); then
        echo "timeout after ${dt}s" >"$OUT/$name.status"
        STATUS=1
    elif ((rc != 0)); then
        echo "failed (exit $rc) after ${dt}s" >"$OUT/$name.status"
        STATUS=1
    else
        echo "ok in ${dt}s" >"$OUT/$name.status"
    fi
}

run tests 90 "$PY" -m pytest -q -p no:cacheprovider -m device --device cuda tests
run train_step 150 "$PY" scripts/bench_train_step.py --net vgg16 --device cuda --iters 8 --warmup 2
run train_step_bf16 100 "$PY" scripts/bench_train_step.py --net vgg16 --device cuda --iters 8 \
    --warmup 2 --set TRAIN.OHEM_READONLY_DTYPE bfloat16
run mining 40 "$PY" scripts/bench_mining.py --device cuda --repeat 20
run training 200 "$PY" scripts/gpu_train_check.py --iters 200 --device cuda --out "$OUT/train"
rm -rf "$OUT/train/output" "$OUT/train/data"  # snapshots and images: GBs

"$PY" - "$OUT" "$((SECONDS - START))" <<'EOF'
"""One summary table from the logs of the steps."""
import re
import sys
from pathlib import Path

import torch

out, total = Path(sys.argv[1]), int(sys.argv[2])


def log(name):
    p = out / f"{name}.log"
    return p.read_text(errors="replace") if p.exists() else ""


def status(name):
    p = out / f"{name}.status"
    return p.read_text().strip() if p.exists() else "not run"


def find(pattern, text, default="?"):
    m = re.search(pattern, text, re.M)
    return m.group(1) if m else default


def train_step(name):
    t = log(name)
    v = [find(p, t) for p in (r"^FRCN\s+step\s+([\d.]+) s/iter", r"^OHEM\s+step\s+([\d.]+) s/iter",
                              r"OHEM / FRCN step time\s+([\d.]+)", r"readonly head .*: ([\d.]+) s/iter",
                              r"peak memory OHEM / FRCN ([\d.]+)", r"ratio_to_ideal ([\d.]+)")]
    return (f"FRCN {v[0]} s/iter, OHEM {v[1]} s/iter (x{v[2]}), readonly head {v[3]} s/iter, "
            f"peak memory OHEM/FRCN {v[4]}, ratio to ideal {v[5]}")


t = log("training")
train = [find(p, t) for p in (r"s_per_iter ([\d.]+)", r"loss_first ([\d.]+)",
                              r"loss_last ([\d.]+)", r"peak_mib (\S+)")]
rows = [
    ("device tests (pytest -m device)", "tests",
     find(r"^(=*\s*\d+ passed.*)$", log("tests")).strip("= ")),
    ("train step VGG16, float32", "train_step", train_step("train_step")),
    ("train step VGG16, bf16 readonly", "train_step_bf16", train_step("train_step_bf16")),
    ("OHEM mining 2 x 2000 RoIs", "mining",
     "speedup " + find(r"^speedup ([\d.]+)", log("mining")) + "x over the original's numpy loops (CPU)"),
    ("VGG16 OHEM training, 200 it", "training",
     f"{train[0]} s/iter, loss {train[1]} -> {train[2]}, peak {train[3]} MiB"),
]
gpu = torch.cuda.get_device_name(0)
print()
print(f"GPU check: {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
      f"{total} s in all; logs in {out}")
w1, w2 = max(len(r[0]) for r in rows), max(len(status(r[1])) for r in rows)
print(f"{'step':{w1}}  {'status':{w2}}  result")
print("-" * (w1 + w2 + 60))
for label, name, result in rows:
    print(f"{label:{w1}}  {status(name):{w2}}  {result}")
EOF
exit $STATUS
