"""Decode speed and model memory with a neuron plan: dense vs the plan keeping the first `--keep` of every layer's FFN
neurons (mean-bias fill), batch 1, greedy decode with a KV cache, arms interleaved, median of `--repeats`.

    python benchmarks/neuron_decode.py                       # the bundled demo model, keep 0.7, 1 thread
    python benchmarks/neuron_decode.py --model path/to/checkpoint --keep 0.78 --new-tokens 128

Prints the load average (the figures are only as quiet as the machine), the per-token decode time of each arm, the
measured speedup and the FFN-FLOP share the plan saved (`stats()["ffn_flops_saved_share"]`), and model memory: the
sum of parameter bytes and the process RSS, dense vs applied.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled demo model)")
    parser.add_argument("--keep", type=float, default=0.7, help="share of each FFN's neurons kept at decode")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from skipprofiler.arch.compat import cache_kwargs, cache_out
    from skipprofiler.arch.registry import resolve
    from skipprofiler.plan.model import NeuronSubsets, SkipPlan
    from skipprofiler.runtime import apply_plan
    from skipprofiler.runtime.neurons import projections

    torch.set_num_threads(args.threads)
    if args.model is None:
        from skipprofiler.demo import model_path

        args.model = str(model_path())
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    arch = resolve(model)
    hidden = model.config.hidden_size
    tensors = {}
    for site in arch.sites:
        size = projections(site)[2]
        tensors[f"{site.index}.kept"] = np.arange(int(round(args.keep * size)), dtype=np.int64)
        tensors[f"{site.index}.bias"] = np.zeros(hidden, np.float32)
    plan = SkipPlan(mode="static", neurons=NeuronSubsets("mean", tensors))
    ids = torch.randint(2, model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))

    def decode() -> float:
        """Seconds per decoded token (the prompt pass excluded)."""
        cache = DynamicCache()
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
            cache, token = cache_out(out), out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(args.new_tokens):
                out = model(input_ids=token, use_cache=True, **cache_kwargs(model, cache))
                cache, token = cache_out(out), out.logits[:, -1:].argmax(-1)
            return (time.perf_counter() - start) / args.new_tokens

    def param_bytes() -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    print(f"model {args.model}: {arch.model_type}, {arch.num_layers} layers, hidden {hidden}; keep {args.keep:g}; "
          f"threads {torch.get_num_threads()}; load average before {os.getloadavg()}")
    decode()  # warm-up
    dense_bytes, dense_rss = param_bytes(), rss_mib()
    times: dict[str, list[float]] = {"dense": [], "plan": []}
    share = None
    for _ in range(args.repeats):
        times["dense"].append(decode())
        with apply_plan(model, plan) as handle:
            applied_bytes, applied_rss = param_bytes(), rss_mib()
            times["plan"].append(decode())
            share = handle.stats()["ffn_flops_saved_share"]
    dense, planned = statistics.median(times["dense"]), statistics.median(times["plan"])
    print(f"decode ms/token (median of {args.repeats}): dense {dense * 1e3:.3f}, plan {planned * 1e3:.3f}; "
          f"speedup {dense / planned:.3f}x; ffn_flops_saved_share {share:.4f}")
    print(f"all dense: {[round(t * 1e3, 3) for t in times['dense']]}; all plan: "
          f"{[round(t * 1e3, 3) for t in times['plan']]}")
    print(f"parameter bytes: dense {dense_bytes}, applied {applied_bytes} ({applied_bytes / dense_bytes:.4f}x); "
          f"RSS MiB: dense {dense_rss:.1f}, applied {applied_rss:.1f} ({applied_rss / dense_rss:.4f}x)")
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
