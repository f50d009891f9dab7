#!/usr/bin/env python
"""Train the bundled demo model: a 12-layer Llama on the four-class demo corpus, on CPU.

One command (about 70 minutes on 2 cores; log in runs/):
  python scripts/train_demo_model.py --steps 2400 > runs/train_demo.log 2>&1 &

Steps: (1) train a byte-level BPE tokenizer on the train split, (2) train the model with a fixed seed, bf16 autocast
and torch.compile, sampling each sequence's class with fixed weights, (3) save a Hugging Face checkpoint (safetensors
in bf16, config, tokenizer, generation config) into skipprofiler/demo/model, written to a temporary folder first and
renamed. Intermediate checkpoints go to runs/demo-train/ckpt so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "skipprofiler/demo/corpus"
CLASS_WEIGHTS = {"fiction": 0.4, "scripture": 0.2, "docs": 0.15, "code": 0.25}
EOS = "<|endoftext|>"
PAD = "<|pad|>"


def load_split(name: str) -> list[dict]:
    with gzip.open(CORPUS / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=None, model_max_length=512)
    fast.save_pretrained(out_dir)
    return fast


def build_model(vocab_size: int, pad_id: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=704, num_hidden_layers=12,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        initializer_range=0.02,
    )
    return LlamaForCausalLM(config)


class ClassStreams:
    """Per-class token streams (documents joined by EOS); batches are random windows, class drawn by weight."""

    def __init__(self, records: list[dict], tokenizer, eos_id: int):
        self.streams = {}
        for cls in CLASS_WEIGHTS:
            docs = [r["text"] for r in records if r["class"] == cls]
            ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
            flat = []
            for seq in ids:
                flat += seq + [eos_id]
            self.streams[cls] = torch.tensor(flat, dtype=torch.long)

    def batch(self, rng: random.Random, batch_size: int, seq_len: int) -> torch.Tensor:
        classes = rng.choices(list(CLASS_WEIGHTS), weights=list(CLASS_WEIGHTS.values()), k=batch_size)
        rows = []
        for cls in classes:
            s = self.streams[cls]
            start = rng.randrange(0, len(s) - seq_len - 1)
            rows.append(s[start : start + seq_len])
        return torch.stack(rows)


@torch.no_grad()
def heldout_ppl(model, streams: ClassStreams, seq_len: int, max_windows: int = 64) -> dict[str, float]:
    model.eval()
    out = {}
    for cls, s in streams.streams.items():
        n = min(max_windows, (len(s) - 1) // seq_len)
        x = s[: n * seq_len].view(n, seq_len)
        nll, count = 0.0, 0
        for i in range(0, n, 16):
            xb = x[i : i + 16]
            logits = model(input_ids=xb).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), xb[:, 1:].reshape(-1),
                                                     reduction="sum")
            nll += loss.item()
            count += xb[:, 1:].numel()
        out[cls] = math.exp(nll / count)
    model.train()
    return out


def save_checkpoint(model, tokenizer, out_dir: Path, dtype=torch.bfloat16) -> None:
    from transformers import GenerationConfig

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.dtype = dtype
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to the embedding: store it once
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
                     pad_token_id=model.config.pad_token_id, do_sample=False, max_new_tokens=64).save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--checkpoint-every", type=int, default=300)
    ap.add_argument("--run-dir", default=str(REPO / "runs/demo-train"))
    ap.add_argument("--out", default=str(REPO / "skipprofiler/demo/model"))
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    train = load_split("train")
    heldout = load_split("heldout")
    t0 = time.time()
    tok_dir = run_dir / "tokenizer"
    tokenizer = train_tokenizer([r["text"] for r in train], args.vocab_size, tok_dir)
    eos_id, pad_id = tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(PAD)
    print(f"tokenizer: vocab {len(tokenizer)} in {time.time() - t0:.0f}s", flush=True)

    streams = ClassStreams(train, tokenizer, eos_id)
    held_streams = ClassStreams(heldout, tokenizer, eos_id)
    print("train tokens per class:", {k: len(v) for k, v in streams.streams.items()}, flush=True)

    model = build_model(len(tokenizer), pad_id, eos_id)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    def loss_fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                                 x[:, 1:].reshape(-1))

    step_fn = loss_fn if args.no_compile else torch.compile(loss_fn)
    model.train()
    tokens_seen, t_start = 0, time.time()
    log = open(run_dir / "metrics.jsonl", "a")
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = streams.batch(rng, args.batch_size, args.seq_len)
        loss = step_fn(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += x.numel()
        if step % 25 == 0:
            el = time.time() - t_start
            print(f"step {step} loss {loss.item():.3f} lr {lr_at(step):.2e} tokens {tokens_seen} "
                  f"{tokens_seen / el:.0f} tok/s elapsed {el / 60:.1f} min", flush=True)
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            ppl = heldout_ppl(model, held_streams, args.seq_len)
            rec = {"step": step + 1, "tokens": tokens_seen, "minutes": (time.time() - t_start) / 60, "heldout_ppl": ppl}
            print("eval", json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            save_checkpoint(model, tokenizer, run_dir / "ckpt")
    save_checkpoint(model, tokenizer, Path(args.out))
    summary = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "tokens": tokens_seen,
               "minutes": (time.time() - t_start) / 60, "parameters": n_params, "seed": args.seed,
               "class_weights": CLASS_WEIGHTS, "heldout_ppl_windows": heldout_ppl(model, held_streams, args.seq_len)}
    (Path(args.out) / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("done", json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
