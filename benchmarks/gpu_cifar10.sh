#!/usr/bin/env bash
# The CIFAR-10 accuracy protocol of issue 4 (docs/cifar10.md) in calls that each fit the device tool's limits:
# data and FP checkpoints in parts that each fit one call's 64 MiB, training in time-budgeted calls that resume.
#
#   here:   bash benchmarks/gpu_cifar10.sh stage              # shards and fp_*.pt into ddq_runs/cifar10/parts/part0..N
#   device: bash benchmarks/gpu_cifar10.sh receive            # (carry one part per call) shards to data/, checkpoints to work/
#   device: bash benchmarks/gpu_cifar10.sh estimate [ARGS]    # time each kind of run, project the protocol's GPU time
#   device: bash benchmarks/gpu_cifar10.sh train [ARGS]       # one budgeted call of the protocol; repeat until COMPLETE
#   here:   bash benchmarks/gpu_cifar10.sh collect FILES_AT   # results into benchmarks/results/accuracy, state into ddq_runs
#
# ARGS go to `python -m ddq.experiments.cifar10` (e.g. --models resnet20 --epochs 15; --workers 4 on a four-GPU machine). BUDGET_S (default 540)
# is each call's training budget: it leaves a minute of the 10-minute call for start-up and copying.
# RESULTS (default accuracy) names the results folder, here and on the device (ddq_runs/cifar10/RESULTS) and in
# benchmarks/results/RESULTS: an ablation (e.g. RESULTS=accuracy_range_steps with --phase qat --range-lr-scale steps)
# keeps its own table and reuses the FP checkpoints in ddq_runs/cifar10/work.
# `pack` writes what `train` and `estimate` send back under $OUT. CIFAR10_ROOT, RESULTS_DIR and PART_BYTES (the
# bytes a part may hold) replace the defaults, for tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${CIFAR10_ROOT:-ddq_runs/cifar10}
SOURCE=${CIFAR10_SOURCE:-../shared/data/cifar10}
BUDGET_S=${BUDGET_S:-540}
RESULTS=${RESULTS:-accuracy}
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results/$RESULTS}
TRANSFER_LIMIT=$((64 * 1024 * 1024))
command=${1:?usage: gpu_cifar10.sh stage|receive|estimate|train|pack|collect [args]}
shift

part_budget() {  # what one call may carry beside the working tree and the results folder (carried by the last call)
    if [ -n "${PART_BYTES:-}" ]; then echo "$PART_BYTES"; return; fi
    local tree results=0
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s | awk '{s += $1} END {print s + 0}')
    [ -d "$ROOT/$RESULTS" ] && results=$(du -sb "$ROOT/$RESULTS" | cut -f1)
    echo $((TRANSFER_LIMIT - tree - results - 512 * 1024))
}

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
    shards=("$SOURCE"/train_*.npz "$SOURCE"/test_*.npz)
    [ -e "${shards[0]}" ] || { echo "no shards under $SOURCE (set CIFAR10_SOURCE)" >&2; exit 1; }
    budget=$(part_budget)
    rm -rf "$ROOT/parts"
    mkdir -p "$ROOT/parts/part0"
    (cd "$SOURCE" && sha256sum train_*.npz test_*.npz) > "$ROOT/parts/part0/SHA256SUMS"
    used=($(stat -c %s "$ROOT/parts/part0/SHA256SUMS"))
    # First fit, largest first: the shards and the FP checkpoints that exist (a later call's QAT starts from them).
    while read -r size file; do
        [ "$size" -le "$budget" ] || { echo "$file ($size bytes) exceeds a part's $budget bytes" >&2; exit 1; }
        part=0
        while [ "$part" -lt "${#used[@]}" ] && [ $((used[part] + size)) -gt "$budget" ]; do part=$((part + 1)); done
        [ "$part" -lt "${#used[@]}" ] || used+=(0)
        used[part]=$((used[part] + size))
        mkdir -p "$ROOT/parts/part$part"
        cp "$file" "$ROOT/parts/part$part/"
    done < <(stat -c '%s %n' "${shards[@]}" $(compgen -G "$ROOT/work/fp_*.pt" || true) | sort -rn)
    du -sh "$ROOT"/parts/part*
    last=$((${#used[@]} - 1))
    echo "${#used[@]} device calls, back to back, each running: bash benchmarks/gpu_cifar10.sh receive"
    for part in $(seq 0 "$last"); do
        carry="\"$ROOT/parts/part$part\""
        [ "$part" -eq "$last" ] && [ -d "$ROOT/$RESULTS" ] && carry="$carry, \"$ROOT/$RESULTS\""
        echo "  call $((part + 1)): carry [$carry]"
    done
    echo "the last call may go on: bash benchmarks/gpu_cifar10.sh receive && bash benchmarks/gpu_cifar10.sh train ..."
    ;;
receive)
    mkdir -p "$ROOT/data" "$ROOT/work"
    for part in "$ROOT"/parts/part*; do
        [ -d "$part" ] || continue
        find "$part" -maxdepth 1 -type f -name 'fp_*.pt' -exec mv {} "$ROOT/work/" \;
        find "$part" -maxdepth 1 -type f -exec mv {} "$ROOT/data/" \;
    done
    count=$(ls "$ROOT"/data/*.npz 2>/dev/null | wc -l)
    echo "$count of 12 shards in $ROOT/data; checkpoints: $(cd "$ROOT/work" && ls fp_*.pt 2>/dev/null | tr '\n' ' ')"
    if [ "$count" -eq 12 ] && [ -f "$ROOT/data/SHA256SUMS" ]; then
        (cd "$ROOT/data" && sha256sum -c --quiet SHA256SUMS) && echo "all 12 shards verified"
    fi
    ;;
pack)
    copy_out
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
    mkdir -p "$RESULTS_DIR" "$ROOT"
    tar xzf "$from/cifar10_results.tgz" -C "$ROOT"
    cp -r "$ROOT/$RESULTS/." "$RESULTS_DIR/"
    if compgen -G "$from/cifar10_work.tgz.part-*" > /dev/null; then
        cat "$from"/cifar10_work.tgz.part-* | tar xzf - -C "$ROOT"
    fi
    echo "results in $RESULTS_DIR; state for a cold machine in $ROOT/{$RESULTS,work}"
    ;;
*)
    echo "unknown command $command; use stage, receive, estimate, train, pack or collect" >&2
    exit 2
    ;;
esac
