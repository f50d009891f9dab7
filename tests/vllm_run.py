"""Run vLLM once in a fresh process for tests/test_vllm_plugin.py (vLLM starts worker processes and keeps global
state: one engine per process). Usage: python tests/vllm_run.py JOB.json -> prints one line ``RESULT {json}``.

JOB: {"model": folder, "plan": path or null, "llm": {LLM kwargs}, "runs": [[[token ids], ...], ...], "max_tokens": n}
Each run is one ``generate`` call over its prompts (greedy, ignore_eos); per run the token ids generated per prompt
and, with a plan, the plugin's counters before and after (``collective_rpc("skipprof_stats")``: the first worker's;
``after_ranks``: every worker's).

With ``"workload": {"requests": [{"prompt": [ids], "max_tokens": n, "arrive": k}, ...]}`` (tests/test_vllm_workloads.py)
the requests are instead served through the engine's step API: each is added once the front end has taken ``k`` steps
(``LLMEngine.step``), so it arrives while the earlier ones decode; ``"passes": n`` serves the workload n times over.
Per pass: per request its tokens and, at its arrival, how many requests were decoding; the wall time and generated
tokens of the whole workload; the preemptions it caused (vLLM's ``vllm:num_preemptions`` counter, needs
``disable_log_stats: false`` in ``llm``); the plugin's counters before and after.
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
    if job.get("workload"):
        return run_workload(llm, job)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    runs = []
    for prompts in job["runs"]:
        before = llm.collective_rpc("skipprof_stats")[0] if job.get("plan") else None
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        ranks = llm.collective_rpc("skipprof_stats") if job.get("plan") else [None]
        runs.append({"tokens": [list(o.outputs[0].token_ids) for o in outputs], "before": before, "after": ranks[0],
                     "after_ranks": ranks})
    return {"runs": runs}


def run_workload(llm, job: dict) -> dict:
    """The workload served ``passes`` times (default 1) by the same engine, one result per pass."""
    import time

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    stats = (lambda: llm.collective_rpc("skipprof_stats")[0]) if job.get("plan") else (lambda: None)
    logged = job["llm"].get("disable_log_stats") is False

    def preemptions():
        return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions") if logged else None

    requests = job["workload"]["requests"]

    def serve(tag: str) -> dict:
        pending = sorted(range(len(requests)), key=lambda i: requests[i]["arrive"])
        tokens: dict[int, list[int]] = {}
        finished: set[int] = set()
        decoding_at_arrival: dict[int, int] = {}
        arrived_at: dict[int, int] = {}
        ids: dict[str, int] = {}
        steps = 0
        before, preempted = stats(), preemptions()
        start = time.perf_counter()
        while pending or engine.has_unfinished_requests():
            # a request arrives once its step is reached (or at once if nothing else runs: no idle steps)
            while pending and (requests[pending[0]]["arrive"] <= steps or not engine.has_unfinished_requests()):
                i = pending.pop(0)
                decoding_at_arrival[i] = sum(1 for j, t in tokens.items() if t and j not in finished)
                arrived_at[i] = steps
                params = SamplingParams(temperature=0.0, max_tokens=requests[i]["max_tokens"], ignore_eos=True)
                rid = f"{tag}-{i}"
                ids[engine.add_request(rid, TokensPrompt(prompt_token_ids=requests[i]["prompt"]), params)] = i
                ids[rid] = i  # RequestOutput carries the id given (vLLM adds a random suffix internally)
            for out in engine.step():
                i = ids[out.request_id]
                tokens[i] = list(out.outputs[0].token_ids)
                if out.finished:
                    finished.add(i)
            steps += 1
        seconds = time.perf_counter() - start
        after = preemptions()
        return {"tokens": [tokens.get(i, []) for i in range(len(requests))],
                "decoding_at_arrival": [decoding_at_arrival[i] for i in range(len(requests))],
                "arrived_at": [arrived_at[i] for i in range(len(requests))], "steps": steps, "seconds": seconds,
                "generated": sum(len(t) for t in tokens.values()),
                "preemptions": None if after is None else after - preempted, "before": before, "after": stats()}

    return {"passes": [serve(f"p{p}") for p in range(job["workload"].get("passes", 1))]}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        result = main(json.load(f))
    print("RESULT " + json.dumps(result), flush=True)
