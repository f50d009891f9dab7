"""What an adaptive plan's own work costs per decode step: the runtime's hooks timed inside a real decode loop.

An adaptive plan that never fires (tau above any cosine) keeps every trigger layer computing its cosine, so the
time spent in the runtime's hooks is the rule's whole overhead with nothing saved. Also times the same cosine on
the same tensor sizes in isolation, for comparison. Explains the break-even of low-ratio adaptive arms in
docs/benchmarks.md.

    python benchmarks/adaptive_overhead.py --threads 2                   # 100 M Llama, bs 1, fp32 and bf16
    python benchmarks/adaptive_overhead.py --threads 2 --batch 8 --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch


def _timed(fn, totals: dict[str, int], key: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter_ns() - start
    return wrapper


def time_hooks(model, totals: dict[str, int]) -> None:
    """Wrap every forward (pre-)hook the runtime registered with a timer (hook dicts are torch's OrderedDicts)."""
    for module in model.modules():
        for hooks, kind in ((module._forward_pre_hooks, "pre"), (module._forward_hooks, "post")):
            for key, fn in list(hooks.items()):
                name = getattr(fn, "__name__", "hook")
                label = f"{name} ({'model' if module is model else 'decoder layer'} {kind}-hook)"
                hooks[key] = _timed(fn, totals, label)


def isolated_cosine_us(hidden: int, rows: int, dtype: torch.dtype, calls: int = 2000) -> float:
    """The layer hook's cosine, cos(s - c, s) in float32, on fresh tensors outside the decode loop."""
    s, c = torch.randn(rows, hidden, dtype=dtype), torch.randn(rows, hidden, dtype=dtype)

    def cosine():
        stream = s.float()
        return torch.nn.functional.cosine_similarity(stream - c.float(), stream, dim=-1).tolist()

    for _ in range(200):
        cosine()
    start = time.perf_counter_ns()
    for _ in range(calls):
        cosine()
    return (time.perf_counter_ns() - start) / calls / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-100m", help="a synthetic model of skipprofiler.evaluation.bench")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", action="append", choices=["fp32", "bf16"], help="repeatable; default both")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from skipprofiler.evaluation.bench import DTYPES, benchmark_prompt, synthetic_model
    from skipprofiler.arch.greedy import greedy_decode
    from skipprofiler.plan.model import SkipPlan
    from skipprofiler.runtime import apply_plan

    for dtype_name in args.dtype or ["fp32", "bf16"]:
        model = synthetic_model(args.model, DTYPES[dtype_name])
        L = model.config.num_hidden_layers
        never = SkipPlan(mode="adaptive", tau=[2.0] * L, cold_start=2, cold_end=2, max_skip=4)
        prompt = benchmark_prompt(model, args.batch, 16)
        greedy_decode(model, prompt, 8)  # warm-up
        steps, per_hook = [], defaultdict(list)
        with apply_plan(model, never):
            time_hooks(model, totals := defaultdict(int))
            for _ in range(args.repeats):
                totals.clear()
                start = time.perf_counter()
                greedy_decode(model, prompt, args.new_tokens)
                steps.append((time.perf_counter() - start) / args.new_tokens * 1e3)
                for label, ns in totals.items():
                    per_hook[label].append(ns / args.new_tokens / 1e3)
        step = statistics.median(steps)
        trigger_layers = (L - never.cold_end - 2) - (never.cold_start - 1) + 1  # cold_start - 1 .. L - cold_end - 2
        print(f"{args.model} {dtype_name} bs {args.batch}, {torch.get_num_threads()} threads: decode step "
              f"{step:.2f} ms (median of {args.repeats}), plan that never fires, {trigger_layers} trigger layers")
        total = 0.0
        for label, values in sorted(per_hook.items()):
            us = statistics.median(values)
            total += us
            print(f"  {label:<44} {us:8.1f} us/step  {us / 1e3 / step:6.2%} of a step")
        print(f"  {'all runtime hooks':<44} {total:8.1f} us/step  {total / 1e3 / step:6.2%} of a step")
        alone = isolated_cosine_us(model.config.hidden_size, args.batch, DTYPES[dtype_name])
        print(f"  the same cosine in isolation: {alone:.1f} us per call")


if __name__ == "__main__":
    main()
