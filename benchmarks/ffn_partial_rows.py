"""What a partly skipped FFN costs in a small decode batch: the FFN over K of B rows (gathered, run, scattered back)
against the FFN over all B rows, median of interleaved repeats. Explains the runtime's masked path for small
mixed batches (`action_from_flags` in skipprofiler/runtime/positionwise.py).

    python benchmarks/ffn_partial_rows.py --threads 2                  # 100 M Llama FFN (768 -> 2048), B = 8
    python benchmarks/ffn_partial_rows.py --hidden 4096 --intermediate 11008 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calls", type=int, default=200, help="FFN calls per timing")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate)).eval()
    rows = torch.randn(args.batch, args.hidden)

    def all_rows() -> None:
        mlp(rows.unsqueeze(0))

    def kept_rows(kept: torch.Tensor):
        def run() -> None:
            y = mlp(rows.index_select(0, kept).unsqueeze(0))
            torch.zeros_like(rows).index_copy_(0, kept, y.reshape(-1, args.hidden))
        return run

    arms = {"all rows (masked)": all_rows}
    arms.update({f"{k} rows gathered": kept_rows(torch.arange(k)) for k in range(1, args.batch)})
    times: dict[str, list[float]] = {name: [] for name in arms}
    with torch.inference_mode():
        for rep in range(args.repeats + 1):  # the first round warms up and is dropped
            for name, fn in arms.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                if rep:
                    times[name].append((time.perf_counter() - start) / args.calls)
    full = statistics.median(times["all rows (masked)"])
    print(f"FFN {args.hidden} -> {args.intermediate}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"  {name:<20} {t * 1e3:7.3f} ms   {t / full:5.2f}x the all-rows cost")


if __name__ == "__main__":
    main()
