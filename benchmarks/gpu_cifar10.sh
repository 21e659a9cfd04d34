#!/usr/bin/env bash
# The CIFAR-10 accuracy protocol of issue 4 (docs/cifar10.md) in calls that each fit the device tool's limits:
# data in parts of <= 4 shards (64 MiB per call), training in time-budgeted calls that resume.
#
#   here:   bash benchmarks/gpu_cifar10.sh stage              # copy shards into ddq_runs/cifar10/parts/part{0,1,2}
#   device: bash benchmarks/gpu_cifar10.sh receive            # (carry one part per call) move it into the data folder
#   device: bash benchmarks/gpu_cifar10.sh estimate [ARGS]    # time each kind of run, project the protocol's GPU time
#   device: bash benchmarks/gpu_cifar10.sh train [ARGS]       # one budgeted call of the protocol; repeat until COMPLETE
#   here:   bash benchmarks/gpu_cifar10.sh collect FILES_AT   # results into benchmarks/results/accuracy, state into ddq_runs
#
# ARGS go to `python -m ddq.experiments.cifar10` (e.g. --models resnet20 --epochs 15; --workers 4 on a four-GPU machine). BUDGET_S (default 540)
# is each call's training budget: it leaves a minute of the 10-minute call for start-up and copying.
# RESULTS (default accuracy) names the results folder, here and on the device (ddq_runs/cifar10/RESULTS) and in
# benchmarks/results/RESULTS: an ablation (e.g. RESULTS=accuracy_range_steps with --phase qat --range-lr-scale steps)
# keeps its own table and reuses the FP checkpoints in ddq_runs/cifar10/work.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=ddq_runs/cifar10
SOURCE=${CIFAR10_SOURCE:-../shared/data/cifar10}
BUDGET_S=${BUDGET_S:-540}
RESULTS=${RESULTS:-accuracy}
command=${1:?usage: gpu_cifar10.sh stage|receive|estimate|train|collect [args]}
shift

copy_out() {  # results and the state a cold machine needs, back to this machine through $OUT
    # The device tool returns at most 8 files of 16 MiB each, two folders down: the results travel as one archive
    # and the training state (FP checkpoints, half-finished runs) as an archive cut into 15 MiB pieces.
    [ -n "${OUT:-}" ] || return 0
    tar czf "$OUT/cifar10_results.tgz" -C "$ROOT" "$RESULTS"
    tar czf - -C "$ROOT" work | split -b 15M -a 1 - "$OUT/cifar10_work.tgz.part-"
    cp "$ROOT/$RESULTS/table.md" "$OUT/" 2>/dev/null || true
}

case "$command" in
stage)
    mkdir -p "$ROOT/parts"
    shards=("$SOURCE"/train_*.npz "$SOURCE"/test_*.npz)
    [ -e "${shards[0]}" ] || { echo "no shards under $SOURCE (set CIFAR10_SOURCE)" >&2; exit 1; }
    for i in "${!shards[@]}"; do
        part="$ROOT/parts/part$((i / 4))"
        mkdir -p "$part"
        cp "${shards[$i]}" "$part/"
    done
    (cd "$SOURCE" && sha256sum train_*.npz test_*.npz) > "$ROOT/parts/part0/SHA256SUMS"
    du -sh "$ROOT"/parts/part*
    echo "carry ddq_runs/cifar10/parts/partK (K = 0, 1, 2) in three device calls, each running: bash benchmarks/gpu_cifar10.sh receive"
    ;;
receive)
    mkdir -p "$ROOT/data"
    for part in "$ROOT"/parts/part*; do
        [ -d "$part" ] || continue
        find "$part" -maxdepth 1 -type f -exec mv {} "$ROOT/data/" \;
    done
    count=$(ls "$ROOT"/data/*.npz 2>/dev/null | wc -l)
    echo "$count of 12 shards in $ROOT/data"
    if [ "$count" -eq 12 ] && [ -f "$ROOT/data/SHA256SUMS" ]; then
        (cd "$ROOT/data" && sha256sum -c --quiet SHA256SUMS) && echo "all 12 shards verified"
    fi
    ;;
estimate)
    PYTHONUNBUFFERED=1 python3 -m ddq.experiments.cifar10 --phase estimate --data-dir "$ROOT/data" \
        --out "$ROOT/$RESULTS" --work-dir "$ROOT/work" --no-progress "$@"
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
    copy_out
    ;;
train)
    status=0
    PYTHONUNBUFFERED=1 python3 -m ddq.experiments.cifar10 --phase all --data-dir "$ROOT/data" \
        --out "$ROOT/$RESULTS" --work-dir "$ROOT/work" --time-budget-s "$BUDGET_S" --no-progress "$@" || status=$?
    copy_out
    exit $status
    ;;
collect)
    from=${1:?usage: gpu_cifar10.sh collect FILES_AT (the folder that the files of a device call came back to)}
    [ -f "$from/cifar10_results.tgz" ] || { echo "no cifar10_results.tgz in $from" >&2; exit 1; }
    mkdir -p "benchmarks/results/$RESULTS" "$ROOT"
    tar xzf "$from/cifar10_results.tgz" -C "$ROOT"
    cp -r "$ROOT/$RESULTS/." "benchmarks/results/$RESULTS/"
    if compgen -G "$from/cifar10_work.tgz.part-*" > /dev/null; then
        cat "$from"/cifar10_work.tgz.part-* | tar xzf - -C "$ROOT"
    fi
    echo "results in benchmarks/results/$RESULTS; state for a cold machine in $ROOT/{$RESULTS,work}"
    ;;
*)
    echo "unknown command $command; use stage, receive, estimate, train or collect" >&2
    exit 2
    ;;
esac
