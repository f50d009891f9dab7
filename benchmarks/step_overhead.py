"""What the runtime itself costs per decode step: four arms timed side by side in one hand-written decode loop.

* ``dense``: the model, no runtime;
* ``empty plan``: ``apply_plan`` with a static plan that skips nothing (hooks run, nothing is skipped);
* ``static plan``: a static plan skipping the middle `--skip` share of FFN calls;
* ``FFNs removed``: the same FFNs replaced by hand with a function returning zeros (no runtime): what the static plan
  would cost if its bookkeeping were free.

The overheads printed are ``empty plan / dense - 1`` and ``static plan / FFNs removed - 1`` (per-step medians over
interleaved rounds; their spread is the noise). Each extra small op per step is a thread barrier on a busy host, so
run with 1 and 2 threads.

    python benchmarks/step_overhead.py --threads 1
    python benchmarks/step_overhead.py --threads 2 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def decode_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds per decode step of a greedy loop on a DynamicCache (the prompt pass is not timed)."""
    from transformers import DynamicCache

    from skipprofiler.arch.compat import cache_kwargs, cache_out

    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, **cache_kwargs(model, DynamicCache()))
        cache, token = cache_out(out), out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **cache_kwargs(model, cache))
            cache, token = cache_out(out), out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / new_tokens


def removed(model, layers: list[int]):
    """Replace the FFNs of `layers` by a zeros-returning forward; returns the undo."""
    from skipprofiler.arch.registry import resolve

    sites = [s for s in resolve(model).sites if s.index in layers]
    for site in sites:
        site.ffn.forward = lambda x, *a, **k: torch.zeros_like(x)
    return lambda: [site.ffn.__dict__.pop("forward") for site in sites]


def main() -> None:
    from skipprofiler.evaluation.bench import middle_static_plan
    from skipprofiler.demo import model_path
    from skipprofiler.plan.model import SkipPlan
    from skipprofiler.runtime import apply_plan
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--skip", type=float, default=0.25, help="share of FFN calls the static plan skips")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32).eval()
    plan = middle_static_plan(model.config.num_hidden_layers, args.skip)
    layers = sorted(plan.skip_layers)
    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))

    def with_plan(p):
        def run():
            with apply_plan(model, p):
                return decode_seconds(model, prompt, args.new_tokens)
        return run

    def without_ffns():
        undo = removed(model, layers)
        try:
            return decode_seconds(model, prompt, args.new_tokens)
        finally:
            undo()

    arms = {"dense": lambda: decode_seconds(model, prompt, args.new_tokens),
            "empty plan": with_plan(SkipPlan(mode="static")), "static plan": with_plan(plan),
            "FFNs removed": without_ffns}
    for run in arms.values():  # warm-up
        run()
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, run in arms.items():
            seconds[name].append(run())
    median = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"demo model ({model.config.num_hidden_layers} layers), bs 1, fp32, {args.threads} thread(s), "
          f"{args.new_tokens} decode steps, median of {args.rounds} interleaved rounds; static plan skips "
          f"layers {layers}")
    for name in arms:
        print(f"  {name:<14}{median[name] * 1e3:8.3f} ms/step   (min {min(seconds[name]) * 1e3:.3f}, "
              f"max {max(seconds[name]) * 1e3:.3f})")

    def spread(a: str, b: str) -> str:
        ratios = sorted(x / y for x, y in zip(seconds[a], seconds[b]))
        return f"{median[a] / median[b] - 1:+.1%} (rounds {ratios[0] - 1:+.1%} .. {ratios[-1] - 1:+.1%})"

    print(f"empty plan vs dense:          {spread('empty plan', 'dense')}")
    print(f"static plan vs FFNs removed:  {spread('static plan', 'FFNs removed')}")


if __name__ == "__main__":
    main()
