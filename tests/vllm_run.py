"""Run vLLM once in a fresh process for tests/test_vllm_plugin.py (vLLM starts worker processes and keeps global
state: one engine per process). Usage: python tests/vllm_run.py JOB.json -> prints one line ``RESULT {json}``.

JOB: {"model": folder, "plan": path or null, "llm": {LLM kwargs}, "runs": [[[token ids], ...], ...], "max_tokens": n}
Each run is one ``generate`` call over its prompts (greedy, ignore_eos); per run the token ids generated per prompt
and, with a plan, the plugin's counters before and after (``collective_rpc("skipprof_stats")``: the first worker's;
``after_ranks``: every worker's).
"""

from __future__ import annotations

import json
import os
import sys


def main(job: dict) -> dict:
    if job.get("plan"):
        os.environ["SKIPPROF_PLAN"] = job["plan"]
    else:
        os.environ.pop("SKIPPROF_PLAN", None)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=job["model"], dtype="float32", seed=0, **job.get("llm", {}))
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    runs = []
    for prompts in job["runs"]:
        before = llm.collective_rpc("skipprof_stats")[0] if job.get("plan") else None
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        ranks = llm.collective_rpc("skipprof_stats") if job.get("plan") else [None]
        runs.append({"tokens": [list(o.outputs[0].token_ids) for o in outputs], "before": before, "after": ranks[0],
                     "after_ranks": ranks})
    return {"runs": runs}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        result = main(json.load(f))
    print("RESULT " + json.dumps(result), flush=True)
