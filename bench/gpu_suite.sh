#!/usr/bin/env bash
# The GPU path in one run (issue 13): versions, kernel correctness against float64, the test suite
# with CUDA, kernel benchmarks, training and sampling throughput. Each step runs under its own
# timeout, all of them within one overall budget (under 8 minutes on an H100), and writes its
# results as soon as they exist; a failed step is recorded and the next one runs.
#
#   bash bench/gpu_suite.sh [--dry-run] [--out DIR] [--only 0,1,3] [--budget SECONDS]
#
# Results go to DIR, else bench/results/<device-slug>/ (dry run: $TMPDIR/gpu-suite-dry-run): one
# log per step, the JSON/CSV/PNG each step writes, versions.txt, commands.txt (every command as
# run) and summary.txt. When $OUT is set (the device tool), the folder is also packed into
# $OUT/results.tar.gz after every step, since only a few files come back from there.
# Exit status: 0 if every step passed, 1 if any failed, timed out or was skipped for time.
#
# --dry-run runs the same steps on the CPU at toy sizes (Triton interpreter, --config tiny, a few
# steps, a pytest subset), so that a script error never costs GPU time; CI runs it
# (tests/test_gpu_suite.py). See bench/gpu/README.md for the plan and the commands assumed.
set -u -o pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
DRY=0 DIR="" ONLY="" BUDGET=465
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) DIR="${2:?--out needs a folder}"; shift ;;
        --only) ONLY="${2:?--only needs step numbers, e.g. 1,3}"; shift ;;
        --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
PY="${PYTHON:-python3}"

if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1  # set before any triton import: every step runs the interpreter
    export CUDA_VISIBLE_DEVICES=""  # toy sizes on the CPU even where a GPU exists
    DIR="${DIR:-${TMPDIR:-/tmp}/gpu-suite-dry-run}"  # nothing of a dry run belongs in the tree
else
    # Wheels carried for packages the GPU machine lacks (bench/gpu/fetch_wheels.sh).
    if ls .whl/*.whl >/dev/null 2>&1; then
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site .whl/*.whl; then
            export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        else
            echo "warning: installing the carried wheels failed; going on without them" >&2
        fi
    fi
    # The folder name llm.bench attention uses for this device.
    SLUG=$("$PY" -c 'import torch, llm.bench.attention as b
print(b.slug(b.device_name(torch.device("cuda"))))' 2>/dev/null || echo no-cuda)
fi
R="${DIR:-bench/results/${SLUG:-unknown}}"
mkdir -p "$R" || exit 2
R=$(cd "$R" && pwd)
export PYTHONUNBUFFERED=1
export FLASH_ATTENTION_TUNE_CACHE="$R/tune"  # the tiles the benchmarks chose become results too
: > "$R/summary.txt"
: > "$R/commands.txt"
START=$SECONDS
FAILED=0
MATCHED=0  # steps that --only selected

pack() {  # the device tool brings back only a few files from $OUT: one archive, rebuilt each step
    [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ "$R" != "$(cd "$OUT" && pwd)" ] || return 0
    tar -czf "$OUT/.results.tar.gz" -C "$(dirname "$R")" "$(basename "$R")" \
        && mv "$OUT/.results.tar.gz" "$OUT/results.tar.gz" && cp "$R/summary.txt" "$OUT/summary.txt"
}

# step ID NAME TIMEOUT COMMAND...: run COMMAND under min(TIMEOUT, time left), log to $R/ID-NAME.log.
step() {
    local id="$1" name="$2" limit="$3"; shift 3
    case ",$ONLY," in ",,"|*",${id%%[a-z]*},"*|*",$id,"*) ;; *) return 0 ;; esac
    MATCHED=$((MATCHED + 1))
    [ "$DRY" = 1 ] && [ "$limit" -lt 60 ] && limit=60  # the CPU is slower at anything
    local left=$((BUDGET - (SECONDS - START)))
    local log="$R/$id-$name.log" status rc t0=$SECONDS
    echo "$id $name: $(printf '%q ' "$@")" >> "$R/commands.txt"  # quoted: copy-pasteable
    if [ "$left" -lt 5 ]; then
        status="SKIPPED (out of time)"; FAILED=1
    else
        [ "$limit" -gt "$left" ] && limit=$left
        printf '[%4ds] step %s %s (timeout %ss)\n' $((SECONDS - START)) "$id" "$name" "$limit"
        timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
        rc=$?
        case $rc in
            0) status="ok" ;;
            124|137) status="TIMEOUT after ${limit}s"; FAILED=1 ;;
            *) status="FAILED (exit $rc)"; FAILED=1 ;;
        esac
        [ "$rc" = 0 ] || tail -n 5 "$log" | sed 's/^/    | /'
    fi
    printf '%-4s %-36s %-24s %4ds  %s\n' "$id" "$name" "$status" $((SECONDS - t0)) \
        "$(basename "$log")" | tee -a "$R/summary.txt"
    pack
}

if [ "$DRY" = 1 ]; then  # toy sizes: every command line of the real run, on the CPU
    CHECK=(--n 32 --head_dims 16 --dtypes bf16 --cases "static cache Nq=3,window,varlen")
    VARIANT_CHECK=(--n 32 --head_dims 16 --dtypes bf16 --cases "decode Nq=1")
    TESTS=(tests/test_flash_attention.py -k "options_parse or bad_kv_range or tuner")
    SHAPE=(--batch 1 --heads 2 --head_dim 16 --dtype fp32)
    DECODE_SHAPE=(--batch 2 --heads 4 --kv_heads 2 --head_dim 16 --dtype fp32)
    LENGTHS=32 LONG=64 DECODE_LENGTHS=32 MODES=fwd CAUSAL=true VARIANT_MODES=fwd
    VARIANT_LENGTHS=32
    FLASH=sdpa MODELS="tiny" ATTENTIONS="sdpa" STEPS=4 COMPILES="false"
    COMPILED_FIRST="" COMPILED_LAST=""
    TRAIN_ARGS=(--device cpu) DECODE_BATCH=1
    DECODE_ARGS=(--config tiny --device cpu --dtype float32 --new_tokens 4)
    DECODE_COMPILE=""
    FINETUNE_ARGS=(--steps 6 --device cpu)
    SERVE_ARGS=(--config tiny --clients 1,4 --requests 2 --max_tokens 16 --prompt_tokens 16 --max_batch 4)
else
    CHECK=() VARIANT_CHECK=(--dtypes bf16 --head_dims 128)
    TESTS=()
    SHAPE=(--batch 4 --heads 16 --head_dim 128 --dtype bf16)
    DECODE_SHAPE=(--batch 8 --heads 32 --kv_heads 8 --head_dim 128 --dtype bf16)
    LENGTHS=1024,2048,4096,8192,16384 LONG=32768 DECODE_LENGTHS=4096,16384
    MODES=fwd,bwd,fwdbwd CAUSAL=both VARIANT_MODES=fwd,bwd VARIANT_LENGTHS=4096,16384
    FLASH=sdpa_flash MODELS="llama-small gpt2-small" ATTENTIONS="sdpa triton" STEPS=20
    COMPILES="false true" COMPILED_FIRST="llama-small" COMPILED_LAST="gpt2-small"
    TRAIN_ARGS=(--dtype bfloat16 --grad_accum 2) DECODE_BATCH=1,8
    DECODE_ARGS=(--config llama-small --dtype bfloat16 --new_tokens 128 --quantize none)
    DECODE_COMPILE="--compile"
    # The fine-tuning path (packed conversations through the varlen kernel, LoRA) and the server's
    # batched static decode step (a CUDA graph with --compile).
    FINETUNE_ARGS=(--steps 40 --attention triton --dtype bfloat16)
    SERVE_ARGS=(--config llama-small --clients 1,8 --requests 4 --max_tokens 64 --compile)
fi
EXAMPLE="$(mktemp -d)/finetune-example"  # a small model and its data: kept out of the results
# Tiles pinned for the variant timings, so that each variant differs from the base in one thing.
BASE="fwd=128x64x8x3+dkdv=64x128x8x2+dq=128x64x8x3"
VARIANTS="triton:$BASE,triton:heavy_first+$BASE,triton:$BASE+dkdv=32x128x8x3"
VARIANTS="$VARIANTS,triton:$BASE+dkdv=64x64x8x2"
# Pinned for correctness runs, so that nothing is autotuned there (tile=... in flash.Options):
# a fast 16-bit tile for the kernel check, a small one for the tests, whose fp32 cases use exact
# fp32 dots that need small tiles (bench/gpu/README.md).
PIN="tile=64x64x8x3" TEST_PIN="tile=32x32x4x2"
[ "$DRY" = 1 ] && PIN="tile=16x32x4x1" TEST_PIN="tile=16x32x4x1"

# Steps run in the order of what the issue needs most, so that a budget or a call that runs out
# leaves the least important figures missing: correctness, the kernel against SDPA, decode, eager
# training; then the compiled training runs (each pays a compile), variants, and the test suite.
train() {  # train ID MODEL ATTENTION COMPILE TIMEOUT (python -m llm.bench train: bench/gpu/README.md)
    step "$1" "train-$2-$3-compile-$4" "$5" "$PY" -m llm.bench train --config "$2" \
        --steps "$STEPS" --peer none --attention "$3" --compile "$4" "${TRAIN_ARGS[@]}" \
        --json "$R/train-$2-$3-compile-$4.json"
}
i=0 IDS=abcdefgh
trains() {  # trains COMPILE MODEL...: a training run per model and attention backend
    local compile="$1" model attention
    shift
    case " $COMPILES " in *" $compile "*) ;; *) return 0 ;; esac
    for model in "$@"; do
        for attention in $ATTENTIONS; do
            i=$((i + 1))
            train "4${IDS:i-1:1}" "$model" "$attention" "$compile" \
                $([ "$compile" = true ] && echo 180 || echo 45)  # compiling took > 90 s on an H200
        done
    done
}
step 0 versions 30 "$PY" bench/gpu/versions.py "$R/versions.txt"
step 1a check_kernel 150 "$PY" bench/gpu/check_kernel.py ${CHECK[@]+"${CHECK[@]}"} \
    --options "$PIN" --json "$R/check_kernel.json"
step 3a bench 150 "$PY" -m llm.bench attention "${SHAPE[@]}" --lengths "$LENGTHS" \
    --modes "$MODES" --causal "$CAUSAL" --impls "$FLASH,triton" --out "$R" --name attention_bench
step 3b bench_long 30 "$PY" -m llm.bench attention "${SHAPE[@]}" --lengths "$LONG" --modes fwd \
    --causal true --impls naive,triton --out "$R" --name attention_long
# Eager and, with --compile, compiled (a CUDA graph of the compiled step) in one run.
step 5a decode 180 "$PY" -m llm.bench decode "${DECODE_ARGS[@]}" --batch "$DECODE_BATCH" --no_hf \
    ${DECODE_COMPILE:+"$DECODE_COMPILE"} --json "$R/decode.json"
trains false $MODELS
step 6a finetune_example 30 "$PY" -m llm.bench finetune --make_example "$EXAMPLE"
step 6b finetune 120 "$PY" -m llm.bench finetune --init_from "$EXAMPLE/base" \
    --data "$EXAMPLE/chats.jsonl" "${FINETUNE_ARGS[@]}" --json "$R/finetune.json"
step 6c serve 150 "$PY" -m llm.bench serve "${SERVE_ARGS[@]}" --json "$R/serve.json"
trains true $COMPILED_FIRST
step 3c bench_variants 45 "$PY" -m llm.bench attention "${SHAPE[@]}" \
    --lengths "$VARIANT_LENGTHS" --causal true --modes "$VARIANT_MODES" --impls "$VARIANTS" \
    --out "$R" --name attention_variants
step 3d bench_decode 30 "$PY" -m llm.bench attention "${DECODE_SHAPE[@]}" --q_len 1 \
    --lengths "$DECODE_LENGTHS" --modes fwd --impls sdpa,triton \
    --out "$R" --name attention_decode
step 1b check_kernel_variants 45 "$PY" bench/gpu/check_kernel.py "${VARIANT_CHECK[@]}" \
    --options "heavy_first,$PIN" --json "$R/check_kernel_variants.json"
trains true $COMPILED_LAST
# The test suite with CUDA: the kernel's tests compile for the GPU, the tests of the triton backend
# run their models there (tests/helpers.KERNEL_DEVICE); in parallel where pytest-xdist is installed.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && [ "$DRY" = 0 ] && XDIST=(-n 8)
step 2 pytest 300 env FLASH_ATTENTION_OPTIONS="$TEST_PIN" "$PY" -m pytest -q \
    -p no:cacheprovider --durations=10 --junitxml "$R/pytest.xml" ${XDIST[@]+"${XDIST[@]}"} \
    ${TESTS[@]+"${TESTS[@]}"}

if [ "$MATCHED" = 0 ]; then
    echo "gpu_suite.sh: --only $ONLY names no step (steps 0-6, or ids such as 4e: see summary.txt of a run)" >&2
    exit 2
fi
"$PY" bench/gpu/summarize.py "$R" | tee "$R/figures.txt"
echo
echo "summary ($((SECONDS - START)) s; results in $R):"
cat "$R/summary.txt"
pack
exit $FAILED
