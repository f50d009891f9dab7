"""The two families whose FFN is not a plain module call returning its contribution (strategies.py has the rest):
Bloom's FFN adds the residual itself; OPT runs ``fc1 -> activation -> fc2`` inline on flattened ``[B*S, H]``."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..registry import FFNSite
from .patcher import Patcher
from .step import DENSE, Decision, Kind, Step
from .strategies import filler


def skip_bloom(site: FFNSite, step: Step, decision: Decision, original: Callable, x, *args, **kwargs):
    """Bloom's FFN returns residual + contribution: a skipped position returns the residual (times the gain)."""
    residual = args[0] if args else kwargs["residual"]
    scale = step.gain_scale[site.index] if step.gain_scale else None
    res_flat = residual.reshape(-1, residual.shape[-1])
    step.check_rows(res_flat.shape[0], site.index)
    if site.index in step.linear_fill:
        out = res_flat + filler(site, step, res_flat.shape[0], res_flat.shape[-1], res_flat.dtype, res_flat.device,
                                x.reshape(-1, x.shape[-1]))
    else:
        out = res_flat * (scale + 1.0) if scale is not None else res_flat.clone()
    if decision.kind is Kind.MASK:
        y = original(x, residual).reshape(res_flat.shape)
        out = torch.where(decision.skip[:, None], out, y)
    elif decision.kind is Kind.GATHER:
        x_flat = x.reshape(-1, x.shape[-1])
        y = original(x_flat.index_select(0, decision.kept).unsqueeze(0),
                     res_flat.index_select(0, decision.kept).unsqueeze(0))
        out = out.index_copy_(0, decision.kept, y.reshape(-1, res_flat.shape[-1]))
    if step.wants_contribution(site.index):
        step.contribution[site.index] = out - res_flat
    return out.view(residual.shape)


def patch_fc_pair(site: FFNSite, ctx: Any, patcher: Patcher, text: str) -> None:
    """OPT: fc1 drops skipped rows (an empty-width tensor when all skip), fc2 scatters them back into the filler."""
    fc1, fc2, layer = site.fc1, site.fc2, site.index
    fc1_forward, fc2_forward = fc1.forward, fc2.forward
    pending: dict[str, Any] = {}

    def fc1_wrapped(x):
        step = ctx.step
        decision = pending["decision"] = ctx.decision(layer) if step is not None and step.active else DENSE
        if decision.kind is Kind.DENSE:
            return fc1_forward(x)
        step.check_rows(x.shape[0], layer)
        pending["rows"] = x.shape[0]
        pending["input"] = x  # what a linear substitute reads
        if decision.kind is Kind.SKIP_ALL:
            return x.new_empty((x.shape[0], 0))
        return fc1_forward(x if decision.kind is Kind.MASK else x.index_select(0, decision.kept))

    def fc2_wrapped(a):
        step = ctx.step
        decision = pending.pop("decision", DENSE)
        if decision.kind is Kind.DENSE:
            out = fc2_forward(a)
            if step is not None and step.cos_layers and step.wants_contribution(layer):
                step.contribution[layer] = out.reshape(-1, out.shape[-1])
            return out
        out = filler(site, step, pending.pop("rows"), fc2.out_features, a.dtype, a.device, pending.pop("input"))
        if decision.kind is Kind.SKIP_ALL:
            return out
        y = fc2_forward(a)
        if decision.kind is Kind.MASK:
            out = torch.where(decision.skip[:, None], out, y)
        else:
            out = out.index_copy_(0, decision.kept, y.to(out.dtype))
        if step.wants_contribution(layer):
            step.contribution[layer] = out
        return out

    patcher.set_attr(fc1, "forward", fc1_wrapped)
    patcher.set_attr(fc2, "forward", fc2_wrapped)
    patcher.describe(fc1, text + " (fc1 of the FFN pair)")
    patcher.describe(fc2, text + " (fc2 of the FFN pair)")
