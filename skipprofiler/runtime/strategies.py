"""What a patched FFN computes under each decision, for FFN modules that return their contribution (most models;
Bloom and OPT: families.py).

A skipped FFN is not called: it returns a fresh filler tensor (zeros, or the plan's compensation). Under GATHER the
FFN runs on the kept positions only (gather -> ffn on ``[1, K, H]`` -> scatter); under MASK it runs on every position
and the skipped ones are replaced.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..registry import POST_NORM_OUTPUT, RESIDUAL_INSIDE, FFNSite, first_tensor
from .patcher import Patcher
from .step import DENSE, Decision, Kind, Step


def filler(site: FFNSite, step: Step, rows: int, hidden: int, dtype: torch.dtype, device: torch.device,
           ffn_input: torch.Tensor | None = None) -> torch.Tensor:
    """A fresh [rows, H] tensor: what skipped positions contribute (zeros, (gain - 1) * h / mult, the mean, or the
    linear substitute of `ffn_input` [rows, H_in], what the FFN would have read)."""
    substitutes = step.linear_fill.get(site.index)
    if substitutes is not None:
        step.substituted_rows += rows
        step.substitute_flops += rows * sum(s.flops_per_row for s, _ in substitutes)
        if substitutes[0][1] is None:
            return substitutes[0][0](ffn_input).to(dtype)
        out = torch.zeros((rows, hidden), dtype=dtype, device=device)
        for substitute, positions in substitutes:
            out = torch.where(positions[:, None], substitute(ffn_input).to(dtype), out)
        return out
    mean = step.mean_fill.get(site.index)
    if mean is not None:
        return mean.to(dtype).expand(rows, hidden).clone()
    scale = step.gain_scale[site.index] if step.gain_scale else None
    h = step.ffn_input_stream.get(site.index)
    if scale is None or h is None:
        return torch.zeros((rows, hidden), dtype=dtype, device=device)
    return (h.reshape(rows, -1) * scale).to(dtype)


def contribution_of(site: FFNSite, out: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """What a dense FFN call added to the stream, flattened to [P, H] (adaptive plans read their cos from it)."""
    if site.contribution == RESIDUAL_INSIDE:
        residual = args[0] if args else kwargs["residual"]
        return (out - residual).reshape(-1, out.shape[-1])
    out = first_tensor(out)
    c = out.reshape(-1, out.shape[-1])
    if site.multiplier != 1.0:
        return c * site.multiplier
    return c.clone() if site.ffn_output_mutated else c  # Falcon adds attention into the returned tensor in place


def patch_ffn(site: FFNSite, ctx: Any, patcher: Patcher, text: str) -> None:
    """Replace the site's FFN forward(s). `ctx.step` is the current Step, `ctx.decision(layer)` its Decision."""
    if site.ffn is None:
        from .families import patch_fc_pair

        patch_fc_pair(site, ctx, patcher, text)
        return
    original = site.ffn.forward  # the bound class method (or an earlier instance forward, e.g. accelerate's)
    skip = _skip_module
    if site.contribution == RESIDUAL_INSIDE:
        from .families import skip_bloom as skip
    record_here = site.contribution != POST_NORM_OUTPUT  # post-norm sites record in the post-norm hook

    def forward(x, *args, **kwargs):
        step = ctx.step
        decision = ctx.decision(site.index) if step is not None and step.active else DENSE
        if decision.kind is Kind.DENSE:
            out = original(x, *args, **kwargs)
            if step is not None and step.cos_layers and record_here and step.wants_contribution(site.index):
                step.contribution[site.index] = contribution_of(site, out, args, kwargs)
            return out
        return skip(site, step, decision, original, x, *args, **kwargs)

    patcher.set_attr(site.ffn, "forward", forward)
    patcher.describe(site.ffn, text)


def _skip_module(site: FFNSite, step: Step, decision: Decision, original: Callable, x, *args, **kwargs):
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    step.check_rows(flat.shape[0], site.index)
    out = filler(site, step, flat.shape[0], flat.shape[-1], flat.dtype, flat.device, flat)
    if decision.kind is Kind.MASK:
        y = first_tensor(original(x, *args, **kwargs)).reshape(flat.shape[0], -1)
        out = torch.where(decision.skip[:, None], out, y)
    elif decision.kind is Kind.GATHER:
        y = first_tensor(original(flat.index_select(0, decision.kept).unsqueeze(0), *args, **kwargs))
        out = out.index_copy_(0, decision.kept, y.reshape(-1, out.shape[-1]).to(out.dtype))
    if site.contribution != POST_NORM_OUTPUT and step.wants_contribution(site.index):
        c = out * site.multiplier if site.multiplier != 1.0 else out
        step.contribution[site.index] = c.clone() if site.ffn_output_mutated and c is out else c
    return out.view(*shape[:-1], out.shape[-1])
