"""How a prompt's hidden states are pooled into one feature vector for the prompt router (torch only). The profile
recorder pools calibration documents and the runtime router pools prompts with these same two functions, so the
centroids a plan stores and the features a prompt is compared with are computed alike."""

from __future__ import annotations

import torch


def prompt_weights(weights: torch.Tensor, pooling: str, starts_sequence: bool) -> torch.Tensor:
    """[B, S] pooling weights of a prompt's positions. "mean_after_first" drops each row's first real token when the
    forward starts the sequence (a massive-norm attention sink in real LLMs: it would dominate a short prompt's mean,
    so centroids pooled over long calibration documents would not match short prompts)."""
    if pooling == "mean_after_first" and starts_sequence:
        real = weights > 0
        first = real & (real.long().cumsum(1) == 1)
        return weights * (~first)
    return weights


def pool(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B, H] weighted mean of [B, S, H] hidden states (zero rows where no weight)."""
    return (hidden.float() * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)
