#!/usr/bin/env bash
# Export a representative set of plans from one profile, to check that a code change leaves exported plans unchanged
# (compare two OUT_DIRs with scripts/compare_plans.py).
#
#   scripts/reexport_plans.sh PROFILE OUT_DIR
#
# The CLI is called as ${SKIPPROF:-skipprof}, e.g. SKIPPROF="python -m skipprofiler._cli.main" with PYTHONPATH set to
# another checkout. Every export uses the same --gen-len (GEN_LEN, default 256) and --seed (SEED, default 0); the
# calibration data is the bundled split (the profile's corpus). Prints each export's wall time on stderr.
# Run it from the same directory each time: plans record the profile path as given.
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 PROFILE OUT_DIR" >&2
  exit 2
fi
profile="$1"
out_dir="$2"
if [[ ! -f "$profile" ]]; then
  echo "error: profile not found: $profile" >&2
  exit 2
fi
mkdir -p "$out_dir"

read -r -a skipprof <<< "${SKIPPROF:-skipprof}"
common=(--gen-len "${GEN_LEN:-256}" --seed "${SEED:-0}")

export_plan() {  # NAME ARGS...: write OUT_DIR/NAME.yaml
  local name="$1"; shift
  local start=$SECONDS
  "${skipprof[@]}" export-plan "$profile" "${common[@]}" "$@" --out "$out_dir/$name.yaml"
  echo "[reexport] $name: $((SECONDS - start)) s" >&2
}

export_plan static-25-refined       --target-skip 0.25 --mode static --refine
export_plan adaptive-25             --target-skip 0.25 --mode adaptive
export_plan adaptive-25-batch8      --target-skip 0.25 --mode adaptive --batch-decision shared --batch-size 8
export_plan perclass-25-refined     --target-skip 0.25 --mode static --per-class --refine
# writes linear-25-refined.safetensors beside the plan
export_plan linear-25-refined       --target-skip 0.25 --mode static --refine --compensation linear
export_plan mean-output-25-refined  --target-skip 0.25 --mode static --refine --compensation mean_output
export_plan budget-ppl10            --max-ppl-increase 0.10
export_plan adaptive-25-refined     --target-skip 0.25 --mode adaptive --refine
