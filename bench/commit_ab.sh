#!/usr/bin/env bash
# The GPU finetune step of other commits beside the working tree's, in one device call, alternating (session 31
# found the 4 x 64 setting 15% slower on main than on session 6's 94c9b9f this way).
#
#   bash bench/commit_ab.sh export COMMIT...     here: each commit's lorakit/ kernels/ backends/ bench/ into ab/COMMIT
#                                                (untracked, so a device call copies them; delete ab/ afterwards)
#   bash bench/commit_ab.sh run OUTDIR [SETTINGS] [ROUNDS]
#                                                on the device: bench/finetune_gpu.py --peers lorakit7 for the working
#                                                tree and every ab/* in turn, ROUNDS times (default 4x64c, 2);
#                                                SETTINGS `prefill`: bench/predict_gpu.py --only-prefill instead (the
#                                                lean 512-token prompt forward, as `lorakit predict` runs it)
# Needs the gguf wheel in .whl/ on the device (run(carry=[".whl"])).
set -u
case ${1:-} in
export)
    shift
    for c in "$@"; do
        mkdir -p "ab/$c"
        git archive "$c" lorakit kernels backends bench | tar x -C "ab/$c" --exclude='bench/results'
    done ;;
run)
    out=${2:?usage: commit_ab.sh run OUTDIR [SETTINGS] [ROUNDS]}
    settings=${3:-4x64c}
    rounds=${4:-2}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    trees=("$PWD")
    for d in ab/*/; do trees+=("$PWD/${d%/}"); done
    for t in "${trees[@]}"; do
        [ -e "$t/lorakit/kernels" ] || ln -s ../kernels "$t/lorakit/kernels"
        [ -e "$t/lorakit/backends" ] || ln -s ../backends "$t/lorakit/backends"
    done
    for r in $(seq "$rounds"); do
        for t in "${trees[@]}"; do
            name=$( [ "$t" = "$PWD" ] && echo worktree || basename "$t")
            if [ "$settings" = prefill ]; then
                (cd "$t" && PYTHONPATH=/tmp/site:$t timeout 240 python3 bench/predict_gpu.py --only-prefill 2>&1 \
                    | tee "$out/$name-$r.log" | grep -F '"case"' | sed "s|^|$name round $r: |")
            else
                (cd "$t" && PYTHONPATH=/tmp/site:$t timeout 240 python3 bench/finetune_gpu.py --settings "$settings" \
                    --peers lorakit7 --steps 5 --out "$out/$name-$r.json" 2>&1 | grep -E '^[0-9]+x[0-9]+ .*lorakit \(' \
                    | sed "s|^|$name round $r: |")
            fi
        done
    done ;;
*)
    sed -n 2,11p "$0"
    exit 2 ;;
esac
