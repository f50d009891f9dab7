#!/usr/bin/env bash
# Regenerate the checked-in demo plans (plans/) from a profile of the bundled demo model on its calibration split.
#
#   scripts/export_demo_plans.sh [PROFILE] [OUT_DIR]
#
# PROFILE defaults to runs/results/demo-calibration.prof, the profile scripts/make_results.sh writes (or make one with
# `skipprof profile --new-tokens 32 --max-tokens 120000 --out PROFILE`: the default model and data are the bundled demo;
# generated tokens are profiled too so the plans use decode statistics). Writes static plans (KL-refined on the
# bundled calibration split) and adaptive plans at 10/25/35 % (per sequence, and shared for batches of 8), per-class
# plans (with router) and a linear-substitute plan at 25 %, then validates
# each one against the bundled model.
set -euo pipefail

profile="${1:-runs/results/demo-calibration.prof}"
out_dir="${2:-plans}"
if [[ ! -f "$profile" ]]; then
  echo "error: profile not found: $profile (create it with: skipprof profile --out $profile)" >&2
  exit 2
fi
mkdir -p "$out_dir"

for pct in 10 25 35; do
  target="0.${pct}"
  skipprof export-plan "$profile" --target-skip "$target" --mode static --refine --out "$out_dir/demo-static-$pct.yaml"
  skipprof export-plan "$profile" --target-skip "$target" --mode adaptive --out "$out_dir/demo-adaptive-$pct.yaml"
  skipprof export-plan "$profile" --target-skip "$target" --mode adaptive --batch-decision shared --batch-size 8 \
    --out "$out_dir/demo-adaptive-$pct-batch8.yaml"
done
skipprof export-plan "$profile" --target-skip 0.25 --mode static --per-class --refine \
  --out "$out_dir/demo-perclass-25.yaml"
# each skipped FFN replaced by a fitted linear map (layers chosen with the maps in place; writes a .safetensors too)
skipprof export-plan "$profile" --target-skip 0.25 --refine --compensation linear --out "$out_dir/demo-linear-25.yaml"
skipprof export-plan "$profile" --target-skip 0.25 --mode adaptive --per-class \
  --out "$out_dir/demo-perclass-adaptive-25.yaml"

for plan in "$out_dir"/demo-*.yaml; do
  skipprof validate "$plan" --model "$(python -c 'from skipprofiler import demo; print(demo.model_path())')"
done
