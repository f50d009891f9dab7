#!/usr/bin/env bash
# Regenerate the checked-in demo plans (plans/) from a profile of the bundled demo model on its calibration split.
#
#   scripts/export_demo_plans.sh [PROFILE] [OUT_DIR]
#
# PROFILE defaults to runs/demo-calibration.prof; make it first with `skipprof profile` (default model and data are
# the bundled demo; profile generated tokens too so the plans use decode statistics). Writes static and adaptive
# plans at 10/25/35 % and per-class plans (with router) at 25 %, then validates each one.
set -euo pipefail

profile="${1:-runs/demo-calibration.prof}"
out_dir="${2:-plans}"
if [[ ! -f "$profile" ]]; then
  echo "error: profile not found: $profile (create it with: skipprof profile --out $profile)" >&2
  exit 2
fi
mkdir -p "$out_dir"

for pct in 10 25 35; do
  target="0.${pct}"
  for mode in static adaptive; do
    skipprof export-plan "$profile" --target-skip "$target" --mode "$mode" --out "$out_dir/demo-$mode-$pct.yaml"
  done
done
skipprof export-plan "$profile" --target-skip 0.25 --mode static --per-class --out "$out_dir/demo-perclass-25.yaml"
skipprof export-plan "$profile" --target-skip 0.25 --mode adaptive --per-class \
  --out "$out_dir/demo-perclass-adaptive-25.yaml"

for plan in "$out_dir"/demo-*.yaml; do
  skipprof validate "$plan"
done
