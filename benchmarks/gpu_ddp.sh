#!/usr/bin/env bash
# ddq.train on GPUs: MobileNetV2 FP vs DDQ W4A4 on 1 and 2 GPUs through torchrun + DDP/NCCL, on a synthetic
# ImageFolder generated on local disk. Reports img/s per GPU, 2-GPU scaling, peak memory, the fraction of
# step time spent waiting for data, and whether both ranks hold identical bits and model state.
#
#   OUT=/path/to/results bash benchmarks/gpu_ddp.sh
#
# Settings (environment): STEPS (steps per run, default 300), BATCH (per GPU, 128), WORKERS (loader
# processes per GPU, 6), SOURCE_SIZE (side of the generated JPEGs, 256), COMPILE=1 adds a compiled DDQ
# 2-GPU run; MODEL (mobilenet_v2) and IMAGE_SIZE (224) exist for a CPU smoke test of this script
# (MODEL=small_cnn IMAGE_SIZE=32 STEPS=4 BATCH=4 WORKERS=0 runs it with gloo on CPU). Writes $OUT/gpu_ddp.json, the runs' log.jsonl files and the DDQ 2-GPU run's bit plot/table.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:?set OUT to the results folder}
STEPS=${STEPS:-300}
BATCH=${BATCH:-128}
WORKERS=${WORKERS:-6}
SOURCE_SIZE=${SOURCE_SIZE:-256}
MODEL=${MODEL:-mobilenet_v2}
IMAGE_SIZE=${IMAGE_SIZE:-224}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/ddq_gpu_ddp}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT" "$WORK"

# One epoch of the 2-GPU runs is exactly STEPS steps: the DDQ 2-GPU run ends with a full epoch end
# (evaluation, bit table and plot, replica check, checkpoint); the others stop after STEPS steps.
TRAIN_PER_CLASS=$(( (STEPS * BATCH * 2 + 99) / 100 ))
"$PYTHON" - "$WORK/data" "$TRAIN_PER_CLASS" "$SOURCE_SIZE" <<'EOF'
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

root, per_class, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
CLASSES, VAL_PER_CLASS = 100, 10

def write(job):
    split, label, start, count = job
    rng = np.random.default_rng([label, start, split == "val"])
    folder = root / split / f"n{label:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    for index in range(start, start + count):
        path = folder / f"{index:06d}.JPEG"
        if path.exists():
            continue
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        field = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
        pixels = colour * (0.5 + 0.5 * field[..., None]) + rng.normal(0, 12, (size, size, 3))
        pixels[..., label % 3] += 40 * np.sin((label + 1) * 3 * ramp)[None, :]
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)

jobs = [("train", c, s, min(250, per_class - s)) for c in range(CLASSES) for s in range(0, per_class, 250)]
jobs += [("val", c, 0, VAL_PER_CLASS) for c in range(CLASSES)]
with ProcessPoolExecutor() as pool:
    list(pool.map(write, jobs))
print(f"synthetic ImageFolder: {CLASSES} classes x {per_class} train + {VAL_PER_CLASS} val images of {size}x{size} under {root}")
EOF

COMMON=(--model "$MODEL" --image-size "$IMAGE_SIZE" --train-dir "$WORK/data/train" --val-dir "$WORK/data/val" --epochs 1
        --batch-size "$BATCH" --workers "$WORKERS" --optimizer sgd --lr 0.01 --quant-lr 1e-3 --log-every 25 --no-progress)

run() {  # name, GPUs, extra args...
  local name=$1 gpus=$2
  shift 2
  rm -rf "$WORK/$name"
  local started=$SECONDS
  if [ "$gpus" -eq 1 ]; then
    "$PYTHON" -m ddq.train "${COMMON[@]}" --out "$WORK/$name" "$@" 2>&1 | tail -n 30
  else
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$gpus" -m ddq.train "${COMMON[@]}" --out "$WORK/$name" "$@" 2>&1 | tail -n 30
  fi
  echo "$name: $((SECONDS - started)) s wall"
}

"$PYTHON" -c "import torch; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
run fp_1gpu 1 --method fp --stop-after-steps "$STEPS"
run ddq_1gpu 1 --method ddq --weight-bits 4 --act-bits 4 --stop-after-steps "$STEPS"
run fp_2gpu 2 --method fp --stop-after-steps "$STEPS"
run ddq_2gpu 2 --method ddq --weight-bits 4 --act-bits 4
RUNS="fp_1gpu ddq_1gpu fp_2gpu ddq_2gpu"
if [ "${COMPILE:-0}" = 1 ]; then
  run ddq_2gpu_compiled 2 --method ddq --weight-bits 4 --act-bits 4 --compile --stop-after-steps "$STEPS"
  RUNS="$RUNS ddq_2gpu_compiled"
fi

"$PYTHON" - "$WORK" "$OUT" "$STEPS" "$BATCH" "$WORKERS" "$MODEL" $RUNS <<'EOF'
import json
import shutil
import statistics
import sys
from pathlib import Path

import torch

work, out, steps, batch, workers, model, runs = (Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                                                 int(sys.argv[5]), sys.argv[6], sys.argv[7:])
device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
report = {"device": device, "torch": torch.__version__, "steps": steps, "batch_per_gpu": batch,
          "workers_per_gpu": workers, "model": model, "runs": {}}
for name in runs:
    lines = [json.loads(line) for line in (work / name / "log.jsonl").read_text().splitlines()]
    start = next(e for e in lines if e["event"] == "start")
    train = [e for e in lines if e["event"] == "train"]
    steady = [e for e in train if e["step"] > min(100, steps // 3)] or train  # leave out warm-up and compilation
    sync = [e for e in lines if e["event"] == "sync_check"]
    epoch = [e for e in lines if e["event"] == "epoch"]
    report["runs"][name] = {
        "gpus": start["world_size"], "steps": train[-1]["step"] if train else 0,
        "img_s_per_gpu": statistics.median(e["img_s_per_rank"] for e in steady),
        "img_s_total": statistics.median(e["img_s"] for e in steady),
        "data_wait_fraction": statistics.mean(e["data_wait_fraction"] for e in steady),
        "peak_memory_gib_rank0": max(e.get("peak_memory_gib", 0.0) for e in train),
        "final_loss": train[-1]["loss"],
        "replicas_in_sync": all(e["in_sync"] for e in sync) if sync else None,
        "bits_per_rank": [r["bits"] for r in sync[-1]["ranks"]] if sync else None,
        "identical_bits_on_all_ranks": (len({json.dumps(r["bits"]) for r in sync[-1]["ranks"]}) == 1) if sync else None,
        "quantizer_init": next((e["ranks"] for e in lines if e["event"] == "quantizer_init"), None),
        "eval": epoch[-1] if epoch else None,
    }
    shutil.copy(work / name / "log.jsonl", out / f"{name}.log.jsonl")
runs_ = report["runs"]
for method in ("fp", "ddq"):
    if f"{method}_1gpu" in runs_ and f"{method}_2gpu" in runs_:
        runs_[f"{method}_2gpu"]["scaling_vs_1gpu"] = runs_[f"{method}_2gpu"]["img_s_total"] / runs_[f"{method}_1gpu"]["img_s_total"]
for name in ("bits_epoch001.png", "bits_epoch001.txt"):
    if (work / "ddq_2gpu" / name).exists():
        shutil.copy(work / "ddq_2gpu" / name, out / f"ddq_2gpu_{name}")
(out / "gpu_ddp.json").write_text(json.dumps(report, indent=2))
for name, row in runs_.items():
    print(f"{name:<20} {row['gpus']} GPU  {row['img_s_per_gpu']:8.0f} img/s/GPU  scaling {row.get('scaling_vs_1gpu', float('nan')):.2f}  "
          f"peak {row['peak_memory_gib_rank0']:.1f} GiB  data wait {100 * row['data_wait_fraction']:.0f}%  "
          f"in sync {row['replicas_in_sync']}  identical bits {row['identical_bits_on_all_ranks']}")
EOF
