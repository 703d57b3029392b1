#!/usr/bin/env bash
# The SmolLM2 queue, strictly serial (one torch job at a time on a small machine). TINY=1: the tiny random
# LLaMA instead (validation, ~2 min). Outputs in $FIDELITY_DIR/out, logs in $FIDELITY_DIR/logs.
set -uo pipefail
KIT=$(cd "$(dirname "$0")" && pwd)
DIR=${FIDELITY_DIR:-/tmp/fidelity}
P=${PYTHON:-$KIT/../../.venv/bin/python}
export OMP_NUM_THREADS=${THREADS:-2} SDS_DATA_DIR=${SDS_DATA_DIR:-$KIT/../../../shared/data}
mkdir -p "$DIR/out" "$DIR/logs"
cd "$DIR"
if [ -n "${TINY:-}" ]; then
  $P "$KIT/export_calib.py" 8 64 out/calib_tiny.pt; C="--calib out/calib_tiny.pt --tiny --windows 2 --eval-seqlen 128"; W=2
else
  $P "$KIT/export_calib.py" 16 512 out/calib_c4_16x512.pt; C="--calib out/calib_c4_16x512.pt"; W=${WINDOWS:-40}
fi
step() { # tag reference-method our-pruner pattern
  local tag=$1
  echo "$(date +%T) $tag" >> out/times.txt
  $P "$KIT/run_ref.py" --method "$2" --pattern "$4" $C --windows "$W" --out "out/${tag}_ref" > "logs/${tag}_ref.log" 2>&1 \
    || echo "$tag ref: $(tail -1 "logs/${tag}_ref.log")" >> out/failures.txt
  $P "$KIT/run_ours.py" --pruner "$3" --pattern "$4" $C --windows "$W" --out "out/${tag}_ours" > "logs/${tag}_ours.log" 2>&1 \
    || echo "$tag ours: $(tail -1 "logs/${tag}_ours.log")" >> out/failures.txt
  $P "$KIT/compare.py" --ref "out/${tag}_ref" --ours "out/${tag}_ours" --name "$tag" --json "out/${tag}.json" \
    --md out/summary.md > "logs/${tag}_cmp.log" 2>&1
}
for s in ${ONLY:-ria_24 ria_u dsnot_u pz_u}; do
  case $s in
    ria_24) step ria_24 ria ria 2:4 ;;
    ria_u) step ria_u ria ria unstructured ;;
    dsnot_u) step dsnot_u dsnot dsnot unstructured ;;
    pz_u) step pz_u pz pruner_zero unstructured
          [ -z "${TINY:-}" ] && $P "$KIT/pz_exact.py" out/pz_u_ref out/calib_c4_16x512.pt > logs/pz_exact.log 2>&1 ;;
  esac
done
cat out/summary.md; cat out/failures.txt 2>/dev/null
