"""Compiled decode speed on CPU: dense vs an empty and a static plan under HF's compile recipe (StaticCache,
``torch.compile(model.__call__, fullgraph=True, backend="inductor")``: the runtime's hooks included, no graph break).

    python benchmarks/compiled_decode.py --threads 1 --new-tokens 64

One block per arm (a new handle brings new hooks, which dynamo guards on, so arms cannot share a compiled call and are
not interleaved): compile + one warm-up decode, then the median of --repeats timed decodes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-100m", help="synthetic model name (skipprofiler.evaluation.bench)")
    parser.add_argument("--static", type=float, default=0.25, help="skip ratio of the static arm")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import StaticCache

    from skipprofiler.arch.compat import cache_kwargs
    from skipprofiler.evaluation.bench import benchmark_prompt, middle_static_plan, synthetic_model
    from skipprofiler.plan.model import SkipPlan
    from skipprofiler.runtime import apply_plan

    if args.threads:
        torch.set_num_threads(args.threads)
    model = synthetic_model(args.model)
    prompt = benchmark_prompt(model, 1, args.prompt_tokens)

    def decode(call) -> float:
        cache = StaticCache(config=model.config, max_cache_len=args.prompt_tokens + args.new_tokens + 1)
        with torch.no_grad():
            out = call(input_ids=prompt, **cache_kwargs(model, cache), use_cache=True)
            start = time.perf_counter()
            for _ in range(args.new_tokens):
                out = call(input_ids=out.logits[:, -1:].argmax(-1), **cache_kwargs(model, cache), use_cache=True)
            return time.perf_counter() - start

    arms = {"dense": None, "empty plan": SkipPlan(mode="static"),
            f"static {args.static:.0%}": middle_static_plan(model.config.num_hidden_layers, args.static)}
    medians, saved = {}, {}
    for name, plan in arms.items():
        torch._dynamo.reset()
        handle = apply_plan(model, plan) if plan is not None else None
        call = torch.compile(model.__call__, fullgraph=True, backend="inductor", dynamic=False)
        started = time.perf_counter()
        decode(call)
        print(f"{name}: compile and warm-up decode {time.perf_counter() - started:.0f} s", flush=True)
        medians[name] = statistics.median(decode(call) for _ in range(args.repeats))
        saved[name] = handle.stats()["not_computed_ratio"] if handle is not None else 0.0
        if handle is not None:
            handle.remove()
    print(f"{'arm':<16}{'saved':>7}{'tok/s':>9}{'speedup':>9}")
    for name, seconds in medians.items():
        print(f"{name:<16}{saved[name]:>7.1%}{args.new_tokens / seconds:>9.1f}{medians['dense'] / seconds:>8.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
