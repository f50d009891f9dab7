"""Where a vLLM decode step's time goes: the torch profiler over decode steps of a dense, a plan and a control engine.

Each arm is a fresh engine in its own process (dense; SKIPPROF_PLAN=the plan; the control: every FFN through the
plugin's op, none skipped -- benchmarks/vllm_decode.py's routed arm). After a warm-up generate, the worker's torch
profiler (vLLM's ``profiler_config``) records one ``LLM.generate`` of c prompts: the prompt step, then
new-tokens - 1 decode steps. The script prints, per arm, the operators with the most self CPU time per decode step
(the prompt step's share is small at 64 new tokens and included), and the wall time per step, side by side.

    python benchmarks/vllm_step_profile.py --plan plans/smollm2-static-25.yaml --concurrency 1 16

vLLM writes each worker's full table to --out/<arm>-c<c>/*.profiler_out.txt (and a trace for chrome://tracing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_decode import ROOT, _load, routed_plan, smollm2_folder  # noqa: E402

# Rows of vLLM's key_averages table: name, self CPU %, self CPU, CPU total %, CPU total, CPU time avg, calls.
ROW = re.compile(r"^(?P<name>.+?)\s{2,}(?P<self_pct>[\d.]+%)\s+(?P<self>[\d.]+(?:us|ms|s))\s+(?P<total_pct>[\d.]+%)\s+"
                 r"(?P<total>[\d.]+(?:us|ms|s))\s+(?P<avg>[\d.]+(?:us|ms|s))\s+(?P<calls>\d+)\s*$")
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def seconds(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(number) * UNITS[unit]


def parse_table(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        m = ROW.match(line.strip())
        if m:
            rows.append({"name": m["name"].strip(), "self_s": seconds(m["self"]), "total_s": seconds(m["total"]),
                         "calls": int(m["calls"])})
    return rows


def child(args: argparse.Namespace) -> None:
    """One engine: warm up, profile one generate, report its wall time."""
    if args.child == "plan":
        os.environ["SKIPPROF_PLAN"] = args.plan
    elif args.child == "routed":
        os.environ["SKIPPROF_PLAN"] = routed_plan(args.plan)
    else:
        os.environ.pop("SKIPPROF_PLAN", None)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    out = Path(args.trace_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(model=args.model, dtype="float32", max_model_len=1024,
              profiler_config={"profiler": "torch", "torch_profiler_dir": str(out),
                               "torch_profiler_with_stack": False, "torch_profiler_use_gzip": True})
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=[100 + (7 * i + 13 * j) % 5000 for j in range(args.prompt_tokens)])
               for i in range(args.concurrency[0])]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    llm.start_profile()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    llm.stop_profile()
    print("RESULT " + json.dumps({"wall_s": wall}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: SmolLM2 written to runs/vllm/smollm2)")
    p.add_argument("--plan", default=str(ROOT / "plans" / "smollm2-static-25.yaml"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--top", type=int, default=12, help="operators shown per arm")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "vllm-profile"))
    p.add_argument("--json", default=None)
    p.add_argument("--child", choices=["dense", "plan", "routed"], help=argparse.SUPPRESS)
    p.add_argument("--trace-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model is None:
        args.model = str(smollm2_folder(ROOT / "runs" / "vllm" / "smollm2"))
    if args.child:
        child(args)
        return
    report = {"plan": args.plan, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "runs": []}
    for c in args.concurrency:
        for arm in ("dense", "plan", "routed"):
            trace_dir = Path(args.out) / f"{arm}-c{c}"
            for old in trace_dir.glob("*"):
                old.unlink()
            load = _load()
            cmd = [sys.executable, __file__, "--child", arm, "--model", args.model, "--plan", args.plan,
                   "--concurrency", str(c), "--new-tokens", str(args.new_tokens),
                   "--prompt-tokens", str(args.prompt_tokens), "--trace-dir", str(trace_dir)]
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if done.returncode or not lines:
                raise SystemExit(f"{arm} engine failed (rc {done.returncode}): {done.stderr.strip()[-2000:]}")
            wall = json.loads(lines[-1][len("RESULT "):])["wall_s"]
            tables = sorted(trace_dir.glob("*profiler_out*.txt"))
            rows = parse_table(tables[0].read_text()) if tables else []
            steps = args.new_tokens  # one prompt step + new_tokens - 1 decode steps
            report["runs"].append({"arm": arm, "concurrency": c, "load_average_before": load, "wall_s": wall,
                                   "ms_per_step": 1000 * wall / steps, "table": str(tables[0]) if tables else None,
                                   "ops": rows[:args.top * 3]})
            print(f"\n== {arm}, {c} request(s): {1000 * wall / steps:.2f} ms per step (profiled; load {load})")
            print(f"{'operator':<60}{'self ms/step':>14}{'calls/step':>12}")
            for row in sorted(rows, key=lambda r: -r["self_s"])[:args.top]:
                print(f"{row['name'][:59]:<60}{1000 * row['self_s'] / steps:>14.3f}{row['calls'] / steps:>12.1f}")
    if args.json:
        from skipprofiler.atomic import write_text_atomic

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
