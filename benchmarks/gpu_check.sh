#!/usr/bin/env bash
# The one prepared GPU check of issue 16: every GPU measurement in under 9 minutes, set-up included, on a GPU
# machine that may have no package index (benchmarks/gpu_check.py runs the parts; benchmarks/README.md, "GPU check").
#
#   bash benchmarks/gpu_check.sh --fetch-wheels     # here, with a package index: the wheels the GPU image lacks,
#                                                   # into .cache/gpu-wheels (ignored by git: carry it along)
#   bash benchmarks/gpu_check.sh [--out DIR]        # on the GPU machine: offline install, then every part
#   bash benchmarks/gpu_check.sh --cpu-smoke        # any CPU, no install: the same parts at tiny shapes
#
# The GPU image is expected to hold Python 3.12 with its own CUDA torch, transformers, lightning, accelerate,
# safetensors, huggingface_hub, numpy and pyyaml; what it lacks travels as wheels: diffusers, peft (the version the
# tests ran with), DeepSpeed (an sdist, built there with DS_BUILD_OPS=0: its ops compile just in time if needed) and
# their pure-Python dependencies. torch, Ray and MLflow are never carried (the check needs no Ray or MLflow).
#
# Environment: PYTHON (the interpreter; default python3, or the repo's .venv with --cpu-smoke),
# GPU_CHECK_WHEELS (the wheel folder), GPU_CHECK_SITE (where they are installed on the GPU machine),
# GPU_CHECK_BUDGET_S (default 540: 9 minutes, set-up included).
set -euo pipefail

start=$(date +%s)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
wheels=${GPU_CHECK_WHEELS:-$root/.cache/gpu-wheels}
site=${GPU_CHECK_SITE:-/tmp/loom-gpu-check-site}
budget=${GPU_CHECK_BUDGET_S:-540}
max_mib=48  # the device tool carries 64 MiB in all (working tree included): keep the wheels well under it

# Versions the tests ran with (diffusers, peft, DeepSpeed); the rest are their dependencies a CUDA torch image lacks.
BINARY=(diffusers==0.42.1 peft==0.21.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
        "typing-extensions>=4.16" hjson importlib-metadata zipp)
SDIST=(deepspeed==0.19.8)

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

fetch_wheels() {
  local py=${PYTHON:-python3}
  rm -rf "$wheels" && mkdir -p "$wheels"
  # cp312 manylinux x86-64 builds (pure-Python wheels match any platform); --no-deps: every one is named above
  "$py" -m pip download --quiet --no-deps --dest "$wheels" --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 "${BINARY[@]}"
  "$py" -m pip download --quiet --no-deps --no-binary=:all: --dest "$wheels" "${SDIST[@]}"
  local kib
  kib=$(du -sk "$wheels" | cut -f1)
  ls -1 "$wheels"
  echo "wheels: $((kib / 1024)) MiB in $wheels (limit ${max_mib} MiB)"
  if [ "$kib" -gt $((max_mib * 1024)) ]; then
    echo "the wheels take more than ${max_mib} MiB: the device tool carries 64 MiB in all; drop one" >&2
    exit 1
  fi
}

install_offline() {
  local py=$1
  if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
    echo "no wheels in $wheels: run 'bash benchmarks/gpu_check.sh --fetch-wheels' where pip reaches an index," \
         "and carry that folder (.cache/gpu-wheels) to this machine" >&2
    exit 1
  fi
  # --target: nothing of the image is touched; --no-build-isolation: DeepSpeed's setup sees the image's torch
  DS_BUILD_OPS=0 "$py" -m pip install --quiet --no-index --no-deps --no-build-isolation --no-compile \
    --no-cache-dir --disable-pip-version-check --target "$site" "$wheels"/*.whl "$wheels"/deepspeed-*.tar.gz
  export PYTHONPATH="$site:$root/src${PYTHONPATH:+:$PYTHONPATH}"
  "$py" - <<'EOF'
import importlib
import torch
found = {m: getattr(importlib.import_module(m), "__version__", "?")
         for m in ("diffusers", "peft", "deepspeed", "lightning", "transformers", "safetensors")}
print("installed:", ", ".join(f"{k} {v}" for k, v in found.items()), f"| torch {torch.__version__}, CUDA",
      torch.version.cuda, "| cuDNN", torch.backends.cudnn.version(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible")
EOF
}

mode=gpu
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --fetch-wheels) mode=fetch ;;
    --cpu-smoke) mode=smoke ;;
    --out) out=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

case "$mode" in
  fetch)
    fetch_wheels
    ;;
  smoke)
    py=${PYTHON:-$root/.venv/bin/python}
    [ -x "$py" ] || py=python3
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    exec "$py" "$here/gpu_check.py" --cpu-smoke --out "${out:-$(mktemp -d -t loom-gpu-smoke-XXXXXX)}" \
      --budget-s "$budget"
    ;;
  gpu)
    py=${PYTHON:-python3}
    install_offline "$py"
    setup=$(( $(date +%s) - start ))
    echo "set-up took ${setup} s; the parts get $((budget - setup - 15)) s"
    exec "$py" "$here/gpu_check.py" --out "${out:-$root/out/gpu-check}" --budget-s $((budget - setup - 15))
    ;;
esac
