#!/usr/bin/env python
"""Measure the bundled demo model and write its model card, docs/demo-model.md.

  python scripts/demo_model_card.py                 # bundled model, full held-out split
  python scripts/demo_model_card.py --model runs/demo-train/ckpt --out /tmp/card.md

Held-out perplexity: every held-out document of a class, tokenized alone (no packing across documents), cut to the
model's context, next-token loss over all its tokens; perplexity = exp(total NLL / total predicted tokens).
Greedy samples: the first 32 tokens of the first held-out documents of each class as the prompt, 48 greedy tokens.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from skipprofiler import demo  # noqa: E402


def heldout_records() -> list[dict]:
    with gzip.open(demo.corpus_path("heldout"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@torch.no_grad()
def class_perplexity(model, tokenizer, texts: list[str], max_len: int, batch_size: int = 16) -> tuple[float, int]:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_len] for t in texts]
    ids = [x for x in ids if len(x) >= 2]
    ids.sort(key=len)
    nll, count = 0.0, 0
    pad = tokenizer.pad_token_id
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        width = max(len(x) for x in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for r, seq in enumerate(chunk):
            x[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        logits = model(input_ids=x, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = x[:, 1:]
        tok_nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        valid = mask[:, 1:].bool()
        nll += tok_nll[valid].double().sum().item()
        count += int(valid.sum())
    return math.exp(nll / count), count


@torch.no_grad()
def greedy_sample(model, tokenizer, text: str, prompt_tokens: int = 32, new_tokens: int = 48) -> tuple[str, str]:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :prompt_tokens]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(ids[0]), tokenizer.decode(out[0, ids.shape[1]:])


def fence(text: str) -> str:
    return "```text\n" + text.replace("```", "'''") + "\n```"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled demo model)")
    ap.add_argument("--out", default=str(REPO / "docs/demo-model.md"))
    ap.add_argument("--samples", type=int, default=2, help="greedy samples per class")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(args.model) if args.model else demo.model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    summary_file = path / "training_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    on_disk = sum(f.stat().st_size for f in path.iterdir() if f.is_file())

    records = heldout_records()
    classes = list(dict.fromkeys(r["class"] for r in records))
    t0 = time.time()
    ppl_rows = []
    for cls in classes:
        texts = [r["text"] for r in records if r["class"] == cls]
        ppl, count = class_perplexity(model, tokenizer, texts, cfg.max_position_embeddings)
        ppl_rows.append(f"| {cls} | {len(texts)} | {count:,} | {ppl:.1f} |")
        print(f"{cls}: ppl {ppl:.2f} over {count} tokens", file=sys.stderr)
    samples = []
    for cls in classes:
        texts = [r["text"] for r in records if r["class"] == cls][: args.samples]
        samples.append(f"### {cls}\n")
        for text in texts:
            prompt, cont = greedy_sample(model, tokenizer, text)
            samples.append(f"Prompt:\n{fence(prompt)}\nGreedy continuation (48 tokens):\n{fence(cont)}\n")

    train_line = "not recorded"
    if summary:
        train_line = (f"{summary['tokens']:,} tokens ({summary['steps']} steps x batch {summary['batch_size']} x "
                      f"{summary['seq_len']}), {summary['minutes']:.0f} minutes on 2 CPU cores (bf16 autocast, "
                      f"torch.compile), seed {summary['seed']}, class sampling weights {summary['class_weights']}")
    card = f"""# The bundled demo model

A small Llama trained here, from scratch, on the bundled four-class corpus (`skipprofiler/demo/corpus/`, sources and
licences in its `SOURCES.md`). It exists so that every `skipprof` command runs offline out of the box and so that
fidelity figures are measured on real trained weights (FFN saturation does not exist in random weights). It is a toy
for measuring the method, not a useful language model.

Regenerate this card: `python scripts/demo_model_card.py` ({time.time() - t0:.0f} s here).
Retrain the model: `python scripts/build_corpus.py` then `python scripts/train_demo_model.py` (see their docstrings).

## Architecture
| | |
|---|---|
| class | `{type(model).__name__}` (`model_type: {cfg.model_type}`) |
| decoder layers | {cfg.num_hidden_layers} |
| hidden size / FFN size | {cfg.hidden_size} / {cfg.intermediate_size} (SwiGLU) |
| attention heads | {cfg.num_attention_heads} (head dim {cfg.hidden_size // cfg.num_attention_heads}), RoPE |
| context | {cfg.max_position_embeddings} tokens |
| vocabulary | {cfg.vocab_size} (byte-level BPE trained on the train split) |
| parameters | {n_params / 1e6:.2f} M (input and output embeddings tied) |
| stored as | safetensors, bfloat16, {on_disk / 1e6:.1f} MB on disk |
| training | {train_line} |

## Held-out perplexity (per class)
Every held-out document (never used for training or calibration), tokenized alone, up to {cfg.max_position_embeddings}
tokens, loss on every next token.

| class | documents | predicted tokens | perplexity |
|---|---|---|---|
{chr(10).join(ppl_rows)}

## Greedy samples
{chr(10).join(samples)}
"""
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(card, encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
