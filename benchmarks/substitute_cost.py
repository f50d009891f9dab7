"""What linear substitutes cost to fit at a given width: statistics memory per layer and for a whole model, the time
to accumulate them per 1 k positions, and the time of one layer's fit (5 ridge λ on held-out statistics, then the
refit; full rank and rank R).

    python benchmarks/substitute_cost.py                      # d 4096, 32 layers (a 7-8 B Llama's shape)
    python benchmarks/substitute_cost.py --hidden 576 --layers 30 --positions 12000

Random activations stand in for a model's (the cost does not depend on the values). Prints one table.
"""

from __future__ import annotations

import argparse
import time

import torch

from skipprofiler.fit.substitute import DEFAULT_MAX_BYTES, LayerStatistics, LinearStatistics, fit_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--positions", type=int, default=4096, help="positions accumulated for the timing")
    parser.add_argument("--rank", type=int, default=128)
    args = parser.parse_args()
    d = args.hidden
    stats = LayerStatistics(LinearStatistics.zeros(d, d), LinearStatistics.zeros(d, d))
    per_layer = stats.fit.nbytes + stats.heldout.nbytes
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.positions, d, generator=g)
    y = x @ (torch.randn(d, d, generator=g) / d ** 0.5) + 0.1 * torch.randn(args.positions, d, generator=g)
    started = time.perf_counter()
    cut = args.positions * 4 // 5
    stats.fit.add(x[:cut], y[:cut])
    stats.heldout.add(x[cut:], y[cut:])
    accumulate = time.perf_counter() - started
    started = time.perf_counter()
    fit_map(stats)
    full = time.perf_counter() - started
    started = time.perf_counter()
    fit_map(stats, rank=args.rank)
    low = time.perf_counter() - started
    group = max(1, DEFAULT_MAX_BYTES // per_layer)
    print(f"width {d}, {args.layers} layers, torch threads {torch.get_num_threads()}")
    print(f"statistics per layer (fitting + held-out parts, float64): {per_layer / 2**20:,.0f} MiB; all layers "
          f"{per_layer * args.layers / 2**30:,.2f} GiB; at the default bound of {DEFAULT_MAX_BYTES / 2**30:.0f} GiB "
          f"{group} layers per pass -> {-(-args.layers // group)} passes over the calibration windows")
    print(f"accumulating: {accumulate / args.positions * 1000:.3f} s per 1 k positions per layer (float64 on CPU)")
    print(f"fit per layer: full rank {full:.1f} s, rank {args.rank} {low:.1f} s; all layers full rank "
          f"{full * args.layers / 60:.1f} min")


if __name__ == "__main__":
    main()
