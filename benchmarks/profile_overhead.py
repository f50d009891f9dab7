"""Profiling overhead: throughput of `profile_model` / throughput of plain forwards on the same batches, and peak
memory for N vs 10N corpus tokens.

Throughput: the two arms run interleaved (order alternating per repeat), the first repeat is a warm-up and is not
counted, and the ratio printed is the median over repeats of plain_time / profiled_time (>= 0.97 is the bar).
Memory: each budget runs in a fresh subprocess (streaming corpus -> profile_model) and reports ru_maxrss.

    python benchmarks/profile_overhead.py                      # demo model (or a demo-sized random Llama)
    python benchmarks/profile_overhead.py --synthetic          # ~100M-param random Llama (hidden 768, 10 layers)
    python benchmarks/profile_overhead.py --skip-memory --repeats 9 --threads 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _demo_checkpoint() -> Path | None:
    from skipprofiler import demo

    try:
        return demo.model_path()
    except FileNotFoundError:
        ckpt = ROOT / "runs" / "demo-train" / "ckpt"
        return ckpt if (ckpt / "config.json").is_file() else None


def _llama(hidden: int, layers: int, vocab: int, intermediate: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def benchmark_model(args: argparse.Namespace):
    if args.synthetic:
        return _llama(768, 10, 32000, 2048), "random Llama hidden 768, 10 layers, vocab 32000"
    path = Path(args.model) if args.model else _demo_checkpoint()
    if path is None:
        return _llama(256, 12, 8192, 688), "random demo-sized Llama (demo checkpoint not built yet)"
    from skipprofiler.arch.models import load_model, model_source

    source = model_source(str(path))  # a checkpoint folder or a .gguf file
    return load_model(source, dtype=torch.float32), source.display


def make_batches(model, count: int, batch_size: int, seq_len: int):
    from skipprofiler.profile.corpus import Batch

    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(count):
        ids = torch.randint(3, model.config.vocab_size, (batch_size, seq_len), generator=g)
        lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=g)
        lengths[0] = seq_len
        mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
        out.append(Batch(ids, mask, torch.arange(batch_size) % 2, 2))
    return out


def throughput(args: argparse.Namespace) -> None:
    from skipprofiler.profile import ProfileSettings, profile_model

    model, name = benchmark_model(args)
    batches = make_batches(model, args.batches, args.batch_size, args.seq_len)
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    settings = ProfileSettings(reservoir_size=4096, doc_reservoir_size=256)
    forward_kwargs = {"use_cache": False, "logits_to_keep": 1}  # exactly what profile_model's prompt pass calls

    def plain() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, **forward_kwargs)
        return time.perf_counter() - start

    def profiled() -> float:
        start = time.perf_counter()
        profile_model(model, batches, settings, class_names=["a", "b"])
        return time.perf_counter() - start

    print(f"model: {name}; {len(batches)} batches x {args.batch_size} x {args.seq_len} ({tokens} real tokens); "
          f"torch threads {torch.get_num_threads()}")
    ratios, plain_times, profiled_times = [], [], []
    for rep in range(args.repeats + 1):
        if rep % 2 == 0:
            t_plain, t_prof = plain(), profiled()
        else:
            t_prof, t_plain = profiled(), plain()
        if rep == 0:
            continue  # warm-up
        ratios.append(t_plain / t_prof)
        plain_times.append(t_plain)
        profiled_times.append(t_prof)
        print(f"  repeat {rep}: plain {tokens / t_plain:8.0f} tok/s  profiled {tokens / t_prof:8.0f} tok/s  "
              f"ratio {t_plain / t_prof:.3f}")
    median = statistics.median(ratios)
    print(f"profiling throughput / plain-forward throughput: median {median:.3f} over {len(ratios)} repeats "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}); bar >= 0.97: {'PASS' if median >= 0.97 else 'FAIL'}")


def _write_corpus(path: Path, tokens_needed: int) -> None:
    """Cycle the bundled calibration texts until the file holds comfortably more than `tokens_needed` tokens."""
    from skipprofiler import demo

    with gzip.open(demo.corpus_path("calibration"), "rt") as f:
        records = [json.loads(line) for line in f]
    approx_chars = tokens_needed * 6
    written = 0
    with gzip.open(path, "wt") as f:
        while written < approx_chars:
            for r in records:
                f.write(json.dumps({"text": r["text"], "class": r["class"]}) + "\n")
                written += len(r["text"])


def rss_child(tokens: int, corpus_file: str) -> None:
    """Runs in a subprocess: stream `tokens` tokens of the corpus through profile_model, print peak RSS (MiB)."""
    from transformers import AutoTokenizer

    from skipprofiler.profile.corpus import Corpus
    from skipprofiler.profile import ProfileSettings, profile_model

    torch.set_num_threads(1)
    checkpoint = _demo_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = _llama(128, 4, tokenizer.vocab_size, 344)  # small, so 10x the tokens stays quick on a CPU
    corpus = Corpus([corpus_file], tokenizer, max_tokens=tokens, seq_len=128, batch_size=8)
    profile = profile_model(model, corpus.batches(), ProfileSettings(), class_names=lambda: corpus.classes)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens": profile.tokens("prompt"), "peak_rss_mib": peak_kib / 1024}))


def memory(args: argparse.Namespace) -> None:
    if _demo_checkpoint() is None:
        print("memory: skipped (needs the demo tokenizer; the demo checkpoint is not built yet)")
        return
    small, large = args.memory_tokens, args.memory_tokens * 10
    with tempfile.TemporaryDirectory() as tmp:
        corpus_file = Path(tmp) / "corpus.jsonl.gz"
        _write_corpus(corpus_file, large)
        results = {}
        for tokens in (small, large):
            out = subprocess.run([sys.executable, __file__, "--rss-child", str(tokens), str(corpus_file)],
                                 capture_output=True, text=True, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1",
                                                                                      HF_DATASETS_OFFLINE="1"))
            results[tokens] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {results[tokens]['tokens']:>8} tokens: peak RSS {results[tokens]['peak_rss_mib']:.1f} MiB")
    ratio = results[large]["peak_rss_mib"] / results[small]["peak_rss_mib"]
    print(f"peak RSS at 10x the tokens / at 1x: {ratio:.3f}; bar < 1.1: {'PASS' if ratio < 1.1 else 'FAIL'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or .gguf file (default: the demo model)")
    parser.add_argument("--synthetic", action="store_true", help="random ~100M-param Llama instead")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7, help="measured repeats (plus one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-tokens", type=int, default=10_000, help="N for the N vs 10N peak-RSS check")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--rss-child", nargs=2, metavar=("TOKENS", "CORPUS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.rss_child:
        rss_child(int(args.rss_child[0]), args.rss_child[1])
        return
    torch.set_num_threads(args.threads)
    if not args.skip_throughput:
        throughput(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
