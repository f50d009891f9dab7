"""Decode speed: dense vs skip plans, interleaved, median of >= 5, with the FLOP-ideal speedup and their ratio.

    python benchmarks/decode_speed.py                        # ~100 M-param random Llama, bs 1 and 8, fp32 and bf16
    python benchmarks/decode_speed.py --batch 8 --dtype fp32 # adaptive arms per_sequence and shared at bs 8
    python benchmarks/decode_speed.py --batch 1 --dtype fp32 --new-tokens 32 --model synthetic:llama-tiny   # quick

Same engine as `skipprof bench decode` (skipprofiler/evaluation/bench.py); results also go to --json if given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic:llama-100m", help="synthetic:<name>, a checkpoint folder or a .gguf file")
    parser.add_argument("--batch", type=int, action="append", help="batch size (repeatable; default 1 and 8)")
    parser.add_argument("--dtype", action="append", choices=["fp32", "bf16"], help="repeatable; default both")
    parser.add_argument("--static", type=float, default=0.29, help="skip ratio of the static arm (0 = none)")
    parser.add_argument("--adaptive", default="0.05,0.10,0.25,0.35", help="comma-separated adaptive skip targets")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (timings synchronize the device)")
    parser.add_argument("--batch-decision", action="append", choices=["per_sequence", "shared"],
                        help="adaptive arms at batch > 1 (repeatable; default both)")
    parser.add_argument("--json", type=Path, default=None, help="write every row as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from skipprofiler.evaluation.bench import run_suite

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5")
    targets = [float(t) for t in args.adaptive.split(",") if t.strip()]
    suites = run_suite(args.model, args.batch or [1, 8], args.dtype or ["fp32", "bf16"], args.static or None,
                       targets, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, repeats=args.repeats,
                       batch_decisions=tuple(dict.fromkeys(args.batch_decision or ["per_sequence", "shared"])),
                       log=lambda message: print(message, flush=True), device=args.device)
    if args.json:
        rows = [row for suite in suites for row in suite.rows()]
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"threads": torch.get_num_threads(), "device": args.device, "rows": rows}, indent=1))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
