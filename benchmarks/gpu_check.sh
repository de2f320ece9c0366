#!/usr/bin/env bash
# gpu_check.sh: the one script to run on a lent GPU (sized for one H200 in under 8 minutes).
#
#   (a) the GPU correctness tests of the kernels: the `test_gpu_*` tests of tests/kernels (skipped on
#       a CPU), split over a few parallel pytest processes because Triton's autotuner compiles ~14
#       configs per new kernel specialisation, single-threaded, and compiling dominates their time;
#   (b) benchmarks/attention.py: seqlen 512..16k, head_dim 128 and 64, causal, bf16, 16 heads,
#       16k tokens per point, ours vs every SDPA backend (+ flash-attn if installed);
#   (c) benchmarks/cross_entropy.py: vocab 32k..256k at 16k tokens, hidden 4096, bf16, ours vs eager,
#       torch.compile (+ Liger if installed), and linear_logprobs vs its reference.
#   Each part has a wall-clock cap (`timeout`) and the benchmarks a --budget-s after which they start
#   no new point, so the whole script ends within ~8 minutes even when a part hangs.
#
#   (d) csrc (llmsys._C): build the extension once (CUDA kernels with nvcc), the csrc GPU tests,
#       benchmarks/fused_ops.py (rms_norm/rope/swiglu GB/s vs copy bandwidth) and benchmarks/decode.py
#       (split-KV decode attention vs SDPA).
#
#   (e) stages (only with --parts stages; ~7 min, so not in `all`): real `python -m llmsys.train` runs
#       through benchmarks/stages.py, one GPU, bf16: pretrain + SFT on llama-1b (seq 2048, 8 rows), DPO
#       on llama-1b (64 pairs a micro-batch: its rows are ~50 tokens), PPO + GRPO on llama-125m; then the
#       generation benchmark when it exists. It needs the wheels benchmarks/gpu_prepare.sh puts in
#       .cache/gpu_carry/ (carry that path): benchmarks/gpu_carry.py installs them into a
#       throwaway --target and checks the training path imports before any run starts.
#
# Usage, from anywhere (it cd's to the repo root):
#   bash benchmarks/gpu_check.sh            # on the GPU machine, every part; logs + JSON + PNG into $OUT
#   bash benchmarks/gpu_check.sh --parts triton   # (a)-(c) only: ~5-6 min on one H200
#   bash benchmarks/gpu_check.sh --parts csrc     # (d) only: ~5 min; a 15-minute lease runs the two in turn
#   bash benchmarks/gpu_check.sh --parts stages   # (e) only: ~7 min (after gpu_prepare.sh here)
#   bash benchmarks/gpu_check.sh --smoke    # CPU path (also chosen when no GPU is visible): the
#                                           # benchmarks' --smoke runs, the GPU tests collected and skipped
# Output: $OUT when set, else benchmarks/results/: gpu_check-<date>[-smoke].log (everything),
# gpu_check-<date>[-smoke]-<part>.log per part, ...-tests-shard<i>.log per pytest process, and the
# benchmarks' attention-<device>-<date>.json/.png and cross_entropy-<device>-<date>.json/.png.
# Exit status: 0 when every part passed; otherwise the sum of 1 (tests failed or timed out),
# 2 (attention benchmark crashed or timed out), 4 (cross-entropy benchmark crashed or timed out),
# 8 (llmsys._C failed to build), 16 (fused_ops benchmark), 32 (decode benchmark), 64 (the carried
# packages failed to install or import, or a stages run crashed or timed out), 128 (generation benchmark).
# A missed performance target is printed as FAIL but never changes the exit status.
#
# What the GPU machine has: Python 3.12, torch 2.11 + triton 3.6, numpy, pytest, pytest-timeout,
# matplotlib; NOT deepspeed, hydra-core, datasets, wandb, flash-attn, liger-kernel, nor llmsys
# installed. So this script runs from the repo root with PYTHONPATH=$PWD and touches only what needs
# nothing else: tests/conftest.py (os, pathlib, pytest), tests/kernels/conftest.py (torch), the two
# kernel test files and llmsys/kernels (torch, triton), benchmarks/*.py (torch, triton; matplotlib,
# flash_attn, liger_kernel only when importable). Nothing is installed and nothing else is imported.
#
# The stages part alone installs anything, and only into a temporary --target (GPU_CHECK_SITE).
#
# Knobs (environment): PYTHON (default python3), OUT, GPU_CHECK_TEST_SHARDS (default 6),
# GPU_CHECK_CARRY (default .cache/gpu_carry), GPU_CHECK_SITE (default a fresh temporary folder).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$PWD
SMOKE=0
PARTS=all
while [[ $# -gt 0 ]]; do
    case $1 in
        --smoke) SMOKE=1 ;;
        --parts) PARTS=${2:?--parts needs triton, csrc, stages or all}; shift ;;
        --parts=*) PARTS=${1#--parts=} ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (use --smoke, --parts triton|csrc|stages|all, or --help)" >&2; exit 2 ;;
    esac
    shift
done
case $PARTS in
    triton) TEST_FILES=(tests/kernels/test_flash_attention.py tests/kernels/test_cross_entropy.py) ;;
    csrc) TEST_FILES=(tests/kernels/test_rms_norm.py tests/kernels/test_rotary.py tests/kernels/test_swiglu.py
                      tests/kernels/test_decode_attention.py tests/kernels/test_csrc_build.py) ;;
    all) TEST_FILES=(tests/kernels) ;;
    stages) TEST_FILES=() ;;
    *) echo "gpu_check.sh: --parts must be triton, csrc, stages or all, got $PARTS" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
OUT_DIR=${OUT:-$REPO/benchmarks/results}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export OUT=$OUT_DIR
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
export LLMSYS_HOME=${LLMSYS_HOME:-$REPO/.cache/llmsys}  # where llmsys._C is built (same as tests/conftest.py)

HAS_GPU='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
if [[ $SMOKE == 0 ]] && ! "$PY" -c "$HAS_GPU" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device visible to $PY: running the CPU smoke path instead"
    SMOKE=1
fi
if [[ $SMOKE == 1 ]]; then
    export CUDA_VISIBLE_DEVICES=""  # the CPU path, even on a GPU machine
    SUFFIX=-smoke
    SHARDS=2  # exercises the sharding; the GPU tests only get collected and skipped here
    CAP_TESTS=120 CAP_ATTN=120 CAP_CE=120 CAP_BUILD=300 CAP_FUSED=120 CAP_DECODE=120
    CAP_STAGES=400 CAP_GEN=120
    ATTN_ARGS=(--smoke)
    CE_ARGS=(--smoke)
    FUSED_ARGS=(--smoke)
    DECODE_ARGS=(--smoke)
    # The stage runs' shape on a micro model (one CPU process each; the carry is rehearsed, not timed).
    MICRO=(--override model.dim=64 --override model.n_layers=2 --override model.n_heads=4
           --override model.n_kv_heads=2 --override model.ffn_dim=128 --override model.max_seq_len=64
           --override data.bpe_vocab_size=512)
    STAGES_LM=(--stages pretrain,sft --models tiny "${MICRO[@]}" --seq-len 64 --micro-batch 4 --steps 3 --warmup 1)
    STAGES_DPO=(--stages dpo --models tiny "${MICRO[@]}" --seq-len 64 --micro-batch 4 --steps 3 --warmup 1)
    STAGES_RL=(--stages ppo,grpo --models tiny "${MICRO[@]}" --seq-len 64 --micro-batch 4 --rl-steps 2
               --rl-warmup 1 --rollout-per-device 8 --max-new-tokens 8)
    GEN_ARGS=(--smoke)
else
    SUFFIX=
    SHARDS=${GPU_CHECK_TEST_SHARDS:-6}
    # Caps (s) sum to ~7.5 min with the preamble; expected ~5-6 min (see benchmarks/README.md).
    CAP_TESTS=170 CAP_ATTN=160 CAP_CE=120 CAP_BUILD=300 CAP_FUSED=150 CAP_DECODE=150
    ATTN_ARGS=(--seqlens 512,1k,2k,4k,8k,16k --head-dims 128,64 --causal true --dtype bf16 --heads 16
               --tokens 16384 --budget-s 120)
    CE_ARGS=(--vocab 32k,64k,128k,256k --tokens 16k --hidden 4096 --dtype bf16 --budget-s 80)
    FUSED_ARGS=(--hidden 2048,4096,8192,16384 --tokens 16384 --dtype bf16 --budget-s 100)
    DECODE_ARGS=(--budget-s 100)
    # Stages (only with --parts stages): caps sum to ~8.5 min; expected ~6-7 min (see benchmarks/README.md).
    # llama-1b without activation checkpointing (its preset's default): at these shapes it fits an 80 GB
    # part with room, and recomputation is work PaLM's MFU does not count.
    CAP_STAGES=400 CAP_GEN=100
    ONE_B=(--models llama-1b --override model.activation_checkpointing=false --precision bf16)
    STAGES_LM=(--stages pretrain,sft "${ONE_B[@]}" --seq-len 2048 --micro-batch 8 --steps 14 --warmup 4)
    STAGES_DPO=(--stages dpo "${ONE_B[@]}" --seq-len 256 --micro-batch 64 --steps 10 --warmup 3)
    STAGES_RL=(--stages ppo,grpo --models llama-125m --precision bf16 --seq-len 256 --micro-batch 8 --rl-steps 5
               --rl-warmup 2 --rollout-per-device 64 --max-new-tokens 128 --group-size 4)
    GEN_ARGS=(--batches 64,16,1 --budget-s 80)  # the target batch first
fi
PREFIX_PARTS=
[[ $PARTS != all ]] && PREFIX_PARTS=-$PARTS
PREFIX=$OUT_DIR/gpu_check-$(date -u +%Y-%m-%d)$PREFIX_PARTS$SUFFIX
TIMEOUT=()
if command -v timeout >/dev/null; then
    TIMEOUT=(timeout --kill-after=15)
fi

capped() {  # capped SECONDS command...: run with a wall-clock cap when `timeout` exists
    local cap=$1
    shift
    if [[ ${#TIMEOUT[@]} -gt 0 ]]; then "${TIMEOUT[@]}" "$cap" "$@"; else "$@"; fi
}

banner() { printf '\n===== %s  [%s, +%ds]\n' "$1" "$(date -u +%H:%M:%S)" "$SECONDS"; }

preamble() {
    banner "gpu_check${SUFFIX}: $REPO -> $PREFIX*"
    echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)   host: $(hostname)   nproc: $(nproc 2>/dev/null)"
    echo "git: $(git describe --always --dirty --abbrev=12 2>/dev/null || echo 'not a git checkout')"
    if [[ $SMOKE == 0 ]] && command -v nvidia-smi >/dev/null; then
        nvidia-smi
    else
        echo "nvidia-smi: skipped (smoke) or not found"
    fi
    "$PY" - <<'EOF'
import importlib, platform
import torch, triton
print(f"python {platform.python_version()}  torch {torch.__version__} (cuda {torch.version.cuda}, "
      f"cudnn {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None})  "
      f"triton {triton.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
else:
    print("device: none (CPU; Triton interpreter)")
for name in ("numpy", "pytest", "pytest_timeout", "matplotlib", "flash_attn", "flash_attn_interface", "liger_kernel"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name} {getattr(mod, '__version__', '(no __version__)')}")
    except ImportError:
        print(f"  {name}: not installed")
EOF
}

run_tests() {
    # Collect the GPU tests, deal their ids round-robin to $SHARDS pytest processes, run them in
    # parallel (each logs to its own file in $OUT as it goes, so a kill keeps what ran), merge the logs.
    local work rc=0 i n shard_rc pids=() shard=()
    work=$(mktemp -d)
    # -o timeout: pytest-timeout fails one hung test (the ini's 600 s would outlast the shard's cap).
    local pytest_args=(-p no:cacheprovider -o timeout=150 -rfEs -v)
    capped 90 "$PY" -m pytest "${TEST_FILES[@]}" -k test_gpu_ --collect-only -q -p no:cacheprovider \
        > "$work/collect.log" 2>&1
    grep '::' "$work/collect.log" > "$work/ids"
    n=$(wc -l < "$work/ids")
    echo "collected $n GPU tests (${TEST_FILES[*]} -k test_gpu_); $SHARDS shards"
    if [[ $n -eq 0 ]]; then
        cat "$work/collect.log"
        echo "no GPU tests collected: that is a failure"
        rm -rf "$work"
        return 1
    fi
    (( SHARDS > n )) && SHARDS=$n
    rm -f "$PREFIX"-tests-shard*.log
    awk -v n="$SHARDS" -v p="$work/shard" '{ print > (p ((NR - 1) % n)) }' "$work/ids"
    for ((i = 0; i < SHARDS; i++)); do
        mapfile -t shard < "$work/shard$i"
        capped "$CAP_TESTS" "$PY" -m pytest "${pytest_args[@]}" "${shard[@]}" > "$PREFIX-tests-shard$i.log" 2>&1 &
        pids+=($!)
    done
    for ((i = 0; i < SHARDS; i++)); do
        wait "${pids[$i]}"
        shard_rc=$?
        echo "----- shard $i: rc=$shard_rc ($(wc -l < "$work/shard$i") tests)"
        cat "$PREFIX-tests-shard$i.log"
        [[ $shard_rc == 124 || $shard_rc == 137 ]] && echo "----- shard $i TIMED OUT after ${CAP_TESTS}s"
        [[ $shard_rc != 0 ]] && rc=1
    done
    rm -rf "$work"
    echo "----- totals per shard:"
    grep -hE '^=+ .*(passed|failed|error|skipped).* in [0-9.]+s' "$PREFIX"-tests-shard*.log || true
    return $rc
}

part() {  # part NAME command...: run one part, tee its log, record its status
    local name=$1 t0=$SECONDS rc
    shift
    banner "[$name] $*"
    "$@" 2>&1 | tee "$PREFIX-$name.log"
    rc=${PIPESTATUS[0]}
    [[ $rc == 124 || $rc == 137 ]] && echo "[$name] TIMED OUT (wall-clock cap)"
    SUMMARY+=("$(printf '%-14s rc=%-3s %4ds' "$name" "$rc" $((SECONDS - t0)))")
    return "$rc"
}

stages_runs() {
    # The three stages.py runs under one cap, each writing its JSON/PNG into a folder of its own
    # ($OUT/stages-lm, -dpo, -rl: stages.py names its file by device and date, the same for all three).
    local rc=0 group start=$SECONDS budget=$((CAP_STAGES - 30))
    for group in lm dpo rl; do
        local -n group_args=STAGES_${group^^}
        local left=$((budget - (SECONDS - start)))
        if (( left < 30 )); then
            echo "[stages-$group] not started: the part's ${CAP_STAGES}s cap is nearly spent"
            rc=1
            continue
        fi
        banner "[stages-$group] benchmarks/stages.py ${group_args[*]}"
        # --budget-s: no new point after the part's remaining time; --point-timeout: a hung run is killed.
        "$PY" benchmarks/stages.py --sweep stages "${group_args[@]}" --budget-s "$((left - 20))" \
            --point-timeout "$left" --out "$OUT_DIR/stages-$group" || rc=1
    done
    return $rc
}

run_stages_part() {
    # (e): install the carried wheels into a throwaway --target (or, on a CPU without a carry, use this
    # environment as it is), check the training path imports, then the stage runs and the generation
    # benchmark, both in that environment (generation.py imports llmsys.config, hence hydra).
    local status=0 carry=${GPU_CHECK_CARRY:-$REPO/.cache/gpu_carry} site=${GPU_CHECK_SITE:-} gen=()
    if [[ -d $carry/wheels ]]; then
        [[ -n $site ]] || site=$(mktemp -d /tmp/gpu_check-site.XXXXXX)
        part carry "$PY" benchmarks/gpu_carry.py --wheels "$carry/wheels" --target "$site" || return 64
        export PYTHONPATH=$site:$PYTHONPATH
    elif [[ $SMOKE == 0 ]]; then
        echo "no $carry/wheels: run benchmarks/gpu_prepare.sh where PyPI is reachable and carry .cache/gpu_carry"
        return 64
    else
        echo "no $carry/wheels: the smoke run uses this environment's packages"
    fi
    # capped runs a command, not a function: the function and the variables it reads go in with it.
    part stages capped "$CAP_STAGES" bash -c "$(declare -p REPO PY OUT_DIR CAP_STAGES STAGES_LM STAGES_DPO \
        STAGES_RL; declare -f stages_runs banner); stages_runs" || status=$((status | 64))
    # The generation benchmark (issue 14, point 4) where this checkout has one.
    if [[ -f benchmarks/generation.py ]]; then
        gen=(benchmarks/generation.py)
    elif [[ -f benchmarks/decode.py ]] && grep -q -- '--generate' benchmarks/decode.py; then
        gen=(benchmarks/decode.py --generate)
    fi
    if [[ ${#gen[@]} -gt 0 ]]; then
        part generation capped "$CAP_GEN" "$PY" "${gen[@]}" "${GEN_ARGS[@]}" || status=$((status | 128))
    else
        echo "generation benchmark: neither benchmarks/generation.py nor decode.py --generate exists: skipped"
    fi
    return $status
}

main() {
    local status=0
    SUMMARY=()
    preamble
    if [[ $PARTS == stages ]]; then
        run_stages_part
        status=$?
        summary $status
        return $status
    fi
    if [[ $PARTS != triton ]]; then
        # Build llmsys._C once here (with its CUDA kernels on a GPU) rather than in every test shard.
        part build_ext capped "$CAP_BUILD" "$PY" -m llmsys.kernels._ext || status=$((status | 8))
    fi
    part tests run_tests || status=$((status | 1))
    if [[ $PARTS != csrc ]]; then
        part attention capped "$CAP_ATTN" "$PY" benchmarks/attention.py "${ATTN_ARGS[@]}" || status=$((status | 2))
        part cross_entropy capped "$CAP_CE" "$PY" benchmarks/cross_entropy.py "${CE_ARGS[@]}" || status=$((status | 4))
    fi
    if [[ $PARTS != triton ]]; then
        part fused_ops capped "$CAP_FUSED" "$PY" benchmarks/fused_ops.py "${FUSED_ARGS[@]}" || status=$((status | 16))
        part decode capped "$CAP_DECODE" "$PY" benchmarks/decode.py "${DECODE_ARGS[@]}" || status=$((status | 32))
    fi
    summary $status
    return $status
}

summary() {
    banner "summary"
    printf '  %s\n' "${SUMMARY[@]}"
    grep -h '^TARGET' "$PREFIX"-{attention,cross_entropy,fused_ops,decode,stages,generation}.log 2>/dev/null \
        | sed 's/^/  /'
    echo "  files in $OUT_DIR:"
    ls -1 "$OUT_DIR" | sed 's/^/    /'
    echo "gpu_check${SUFFIX}: exit status $1 (1 tests, 2 attention, 4 cross_entropy, 8 build_ext, 16 fused_ops,"\
         "32 decode, 64 stages, 128 generation; targets never count)"
}

main 2>&1 | tee "$PREFIX.log"
exit "${PIPESTATUS[0]}"
