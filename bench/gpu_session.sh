#!/usr/bin/env bash
# One batched GPU session on a machine with torch + triton but without lorakit installed:
#   bash bench/gpu_session.sh OUTDIR [gputests] [acttests] [megatests] [decodetests] [gemvtests] [check] [profile] [profile-decode] [profile-mega] [streamlab] [profile-pt] [loralab] [gemvlab[:VARIANTS]] [decodetiles] [decodetiles-ad] [prefetchtests] [prefetchlab] [tclab] [tccheck] [tests:FILE[,FILE...]] [wgmmatests] [wgmmalab] [wgmmalab-notriton] [wgmmalab-quick] [clocklab] [readfloor] [gemvcold] [gradlab[-quick|-notriton|-quick-triton]] [hostlab] [hostseries] [leanlab] [prefillpaths] [predict] [predict-nohf] [predict-mega] [predict-mega-ab] [launchtest] [prefill-fixed] [ncu-ws] [ncu-gemv] [persistentlab] [persistentlab-ws] [persistentlab-triton] [persistentlab-i8] [megalab[:CFG]] [ncu-chain] [ncu-chain-i8]
#                             [finetune-quick] [finetune-quick-grad] [finetune-quick-nogluon] [adamw-repeat] [finetune] [finetune-main] [finetune-big] [finetune-seed] [trainstep-tests] [finetune-ckpt] [kernels] [kernels-large] [kernels-small] [kernels-decode]
# Needs the gguf wheel in .whl/ (pip download --no-deps gguf). Each step has its own time limit, logs
# to OUTDIR, and a failing step does not stop the next one.
set -u
out=${1:?usage: gpu_session.sh OUTDIR steps...}
shift
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -e lorakit/kernels ] || ln -s ../kernels lorakit/kernels
[ -e lorakit/backends ] || ln -s ../backends lorakit/backends
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# triton's cache (compiled kernels + autotune results) lives in .tcache; its autotune results come back as
# OUTDIR/tcache.tgz;
# copied to .tcache.tgz and carried into a later call (run(carry=[".tcache.tgz"])), it spares the searches
export TRITON_CACHE_DIR=$PWD/.tcache
mkdir -p "$TRITON_CACHE_DIR"
[ -f .tcache.tgz ] && tar xzf .tcache.tgz
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
step() {  # name limit_s command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "=== $name rc=$? ($(date +%T))"
    tail -n 25 "$out/$name.log"
}
for s in "$@"; do
    case $s in
    check)
        step gpu_check 80 env LORAKIT_AUTOTUNE=0 python3 bench/gpu_check.py ;;
    gputests) step pytest_gpu 300 env LORAKIT_AUTOTUNE=0 bash -c "python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_kernels.py; python3 -m pytest -q -x -p no:cacheprovider tests/test_decode.py tests/test_decode_ops.py \
        tests/test_train_ops.py tests/test_train_step_backends.py" ;;
    megatests) step pytest_mega 240 python3 -m pytest -q -p no:cacheprovider tests/test_decode_mega.py tests/test_cuda_prompt.py \
        tests/test_act_q8.py tests/test_predict_cli.py ;;
    acttests) step pytest_act 150 python3 -m pytest -q -p no:cacheprovider tests/test_act_q8.py \
        tests/test_predict_cli.py ;;
    decodetests) step pytest_decode 150 env LORAKIT_AUTOTUNE=0 python3 -m pytest -q -x -p no:cacheprovider \
        tests/test_decode.py tests/test_decode_ops.py ;;
    gemvtests) step pytest_gemv 200 env LORAKIT_AUTOTUNE=0 bash -c "python3 -m pytest -q -x -p no:cacheprovider \
        tests/test_kernels.py -k 'gemv or paths or lora or exhaustive'; python3 -m pytest -q -x -p no:cacheprovider \
        tests/test_decode.py tests/test_decode_ops.py" ;;
    ncu-ws | ncu-gemv)  # Nsight Compute on one launch: the warp-specialized Gluon kernel / the decode GEMV
        what="--path wgmma --cfg ws --m 2048 --n 9600 --k 3200"
        [ "$s" = ncu-gemv ] && what="--path gemv_tc --m 1 --n 3200 --k 8640"
        step "$s" 240 "$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -1)" --kernel-name regex:q8_ --launch-skip 2 --launch-count 1 --section SpeedOfLight \
            --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats \
            --section SchedulerStats --section InstructionStats python3 bench/ncu_kernel.py $what ;;
    persistentlab-ws) step persistent_lab_ws 110 python3 bench/persistent_lab.py --which ws \
        --out "$out/persistent_lab_ws.json" ;;
    persistentlab-i8) step persistent_lab_i8 200 python3 bench/persistent_lab.py --which i8 \
        --out "$out/persistent_lab_i8.json" ;;
    megalab | megalab:*)  # megalab:CFG runs only that decode_mega_lab.py CONFIGS entry
        c=${s#megalab}
        c=${c#:}
        step decode_mega_lab 540 python3 bench/decode_mega_lab.py ${c:+--cfg "$c"} ${MEGA_ARGS:-} --out "$out/decode_mega_lab.json" ;;
    persistentlab-triton) step persistent_lab_triton 200 python3 bench/persistent_lab.py --which triton \
        --out "$out/persistent_lab_triton.json" ;;
    ncu-chain) step ncu_chain 200 "$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -1)" --kernel-name \
        regex:_chain_ws --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section SchedulerStats --section InstructionStats --section SourceCounters \
        python3 bench/persistent_lab.py --which ws --ws-cfg 0 --layers 2 --out "$out/ncu_chain.json" ;;
    ncu-chain-i8) step ncu_chain_i8 200 "$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -1)" --kernel-name \
        regex:_chain_i8 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section SchedulerStats --section InstructionStats --section SourceCounters \
        --launch-skip 1 \
        python3 bench/persistent_lab.py --which i8 --i8-cfg "${NCU_CFG:-0}" --out "$out/ncu_chain_i8.json" ;;
    persistentlab) step persistent_lab 300 python3 bench/persistent_lab.py --out "$out/persistent_lab.json" ;;
    profile) step profile 240 python3 bench/profile_gpu.py --out "$out/profile_h200.json" ;;
    streamlab) step stream_lab 200 python3 bench/stream_lab.py --out "$out/stream_lab.json" ;;
    profile-mega) step profile_mega 300 python3 bench/profile_gpu.py --what mega,mega2 --out "$out/profile_mega.json" ;;
    profile-decode) step profile_decode 200 python3 bench/profile_gpu.py --what decode,decode2 \
        --out "$out/profile_decode.json" ;;
    profile-pt) step profile_pt 240 python3 bench/profile_gpu.py --what prefill,train --out "$out/profile_pt.json" ;;
    loralab) step lora_lab 120 python3 bench/lora_lab.py --out "$out/lora_lab_h200.json" ;;
    gemvlab | gemvlab:*)  # gemvlab:VARIANTS runs only those (comma-separated, bench/gemv_lab.py --variants)
        v=${s#gemvlab}
        v=${v#:}
        step gemv_lab 200 python3 bench/gemv_lab.py ${v:+--variants "$v"} --out "$out/gemv_lab_h200.json" ;;
    prefetchtests) step pytest_prefetch 120 env LORAKIT_AUTOTUNE=0 python3 -m pytest -q -x -p no:cacheprovider \
        tests/test_decode.py tests/test_decode_ops.py -k "prefetch or greedy or matches_batched or attention" ;;
    prefetchlab) step prefetch_lab 420 python3 bench/prefetch_lab.py --out "$out/prefetch_lab.json" ;;
    decodetiles) step decode_tiles 200 python3 bench/decode_tiles_lab.py --out "$out/decode_tiles_lab.json" ;;
    decodetiles-ad) step decode_tiles_ad 200 python3 bench/decode_tiles_lab.py --adapters \
        --out "$out/decode_tiles_lab_ad.json" ;;
    tests:*)  # tests:FILE[,FILE...] runs those test files (all their tests, the gpu-marked ones included)
        f=${s#tests:}
        step "pytest_$(basename "${f%%,*}" .py)" 300 python3 -m pytest -q -p no:cacheprovider ${f//,/ } ;;
    wgmmatests) step pytest_wgmma 300 bash -c "python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wgmma.py; \
        LORAKIT_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py" ;;
    wgmmalab) step wgmma_lab 420 python3 bench/wgmma_lab.py --out "$out/wgmma_lab_h200.json" ;;
    wgmmalab-notriton) step wgmma_lab 300 python3 bench/wgmma_lab.py --no-triton --out "$out/wgmma_lab_h200.json" ;;
    gradlab | gradlab-quick | gradlab-notriton | gradlab-quick-triton)  # the input gradient's Gluon kernel beside cuBLAS, dequantize + cuBLAS, the triton kernel
        q=""
        [ "$s" = gradlab-quick ] && q="--quick --no-triton"
        [ "$s" = gradlab-notriton ] && q="--no-triton"
        [ "$s" = gradlab-quick-triton ] && q="--quick"
        step wgmma_grad_lab 400 python3 bench/wgmma_grad_lab.py $q --out "$out/wgmma_grad_lab.json" ;;
    gemvcold) step gemv_cold_lab 400 python3 bench/gemv_cold_lab.py --out "$out/gemv_cold_lab_h200.json" ;;
    readfloor) step read_floor 300 python3 bench/read_floor.py --out "$out/read_floor_h200.json" ;;
    clocklab) step clock_lab 300 python3 bench/clock_lab.py --seconds 3 --out "$out/clock_lab_h200.json" ;;
    wgmmalab-quick) step wgmma_quick 200 python3 bench/wgmma_lab.py --quick --no-triton --out "$out/wgmma_quick.json" ;;
    tclab) step gemv_tc_lab 300 python3 bench/gemv_lab.py --tc --out "$out/gemv_tc_lab_h200.json" ;;
    tccheck) step gemv_tc_check 200 python3 bench/gemv_tc_check.py ;;
    prefillpaths) step prefill_paths 300 python3 bench/prefill_paths_lab.py --out "$out/prefill_paths_lab.json" ;;
    leanlab) step prefill_lean_lab 300 python3 bench/prefill_lean_lab.py --out "$out/prefill_lean_lab.json" ;;
    hostlab) step host_lab 150 python3 bench/host_lab.py --out "$out/host_lab_h200.json" ;;
    hostseries) step host_series 120 python3 bench/host_lab.py --series 80 --out "$out/host_series.json" ;;
    prefill-fixed) step prefill_fixed 100 env LORAKIT_AUTOTUNE=0 python3 bench/predict_gpu.py --only-prefill ;;
    predict) step predict 540 python3 bench/predict_gpu.py --out "$out/predict_h200.json" ;;
    predict-nohf) step predict 540 python3 bench/predict_gpu.py --skip-hf --out "$out/predict_h200.json" ;;
    predict-mega) step predict_mega 300 env LORAKIT_AUTOTUNE=0 python3 bench/predict_gpu.py --only-mega ;;
    predict-mega-ab)  # the decode launches' overlap off, then on (LORAKIT_LAUNCH_OVERLAP), in one call
        step predict_mega_off 300 env LORAKIT_AUTOTUNE=0 LORAKIT_LAUNCH_OVERLAP=0 python3 bench/predict_gpu.py --only-mega
        step predict_mega_on 200 env LORAKIT_AUTOTUNE=0 python3 bench/predict_gpu.py --only-mega ;;
    launchtest) step pytest_launch 60 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
        -k "launch or grid_arith" ;;
    finetune-quick | finetune-quick-grad | finetune-quick-nogluon)  # -grad: the input gradient's Gluon path a
        # candidate (LORAKIT_GLUON_GRAD=1); -nogluon: no Gluon path (LORAKIT_GLUON=0); A/Bs in one call
        v=LORAKIT_GLUON_GRAD=0
        [ "$s" = finetune-quick-grad ] && v=LORAKIT_GLUON_GRAD=1
        [ "$s" = finetune-quick-nogluon ] && v=LORAKIT_GLUON=0
        n=${s//-/_}
        step "$n" 200 env "$v" python3 bench/finetune_gpu.py --settings 4x64c,8x512,8x512c --peers lorakit7 \
            --out "$out/$n.json" ;;
    finetune) step finetune 560 python3 bench/finetune_gpu.py --settings 4x64c,8x512,8x512c \
        --peers lorakit7,lorakit12,peftc,peft --steps 5 --out "$out/finetune_h200.json" ;;
    finetune-main) step finetune_main 480 python3 bench/finetune_gpu.py --settings 4x64c,8x512,8x512c \
        --peers lorakit7,peftc,lorakit12 --steps 5 --out "$out/finetune_main.json" ;;
    finetune-big) step finetune_big 420 python3 bench/finetune_gpu.py --settings 8x512,8x512c \
        --peers lorakit7,peftc,lorakit12 --steps 5 --out "$out/finetune_big.json" ;;
    adamw-repeat)  # test_gpu_adamw_large failed once in session 12 (call 10), passed in call 4: repeat the step
        # in one process (bench/adamw_repeat.py: every run against the first and the spec), then the whole gpu set
        step adamw_repeat 200 bash -c 'python3 bench/adamw_repeat.py --runs 300; for i in 1 2; do \
            LORAKIT_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py 2>&1 | tail -n 4; done' ;;
    trainstep-tests) step pytest_train 120 env LORAKIT_AUTOTUNE=0 python3 -m pytest -q -x -p no:cacheprovider \
        tests/test_train_ops.py tests/test_train_step_backends.py ;;
    finetune-seed) step finetune_seed 240 python3 bench/finetune_gpu.py --settings 4x64c \
        --peers lorakit7,peftc,lorakit12 --steps 5 --out "$out/finetune_h200_4x64c.json" ;;
    finetune-ckpt) step finetune_ckpt 260 python3 bench/finetune_gpu.py --settings 8x512c \
        --peers lorakit7,peftc,lorakit12 --steps 5 --out "$out/finetune_h200_8x512c.json" ;;
    kernels) step kernels 240 python3 bench/kernels_bench.py --models 3b --out "$out/kernels_h200_3b.json" ;;
    kernels-large) step kernels_large 300 python3 bench/kernels_bench.py --models 3b --m 2048,8192 \
        --out "$out/kernels_large.json" ;;
    kernels-small) step kernels_small 150 python3 bench/kernels_bench.py --models 3b --m 1,256 --no-grad \
        --out "$out/kernels_small.json" ;;
    kernels-decode) step kernels_decode 200 python3 bench/kernels_bench.py --models 3b,8b --m 1,16 --no-grad \
        --out "$out/kernels_h200_decode.json" ;;
    esac
done
# only the autotune results come back (the compiled kernels would exceed what a call may return; the best
# configs recompile in seconds, the searches are what costs minutes)
find .tcache -name '*.autotune.json' | tar czf "$out/tcache.tgz" -T - && ls -la "$out/tcache.tgz"
