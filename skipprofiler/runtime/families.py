"""The two families whose FFN is not a plain module call returning its contribution (ffn.py has the rest): Bloom's
FFN adds the residual itself; OPT runs ``fc1 -> activation -> fc2`` inline on flattened ``[B*S, H]``."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..arch.registry import FFNSite
from .patcher import Patcher
from .schedule import DENSE, Action, Forward, Kind


def skip_bloom(site: FFNSite, forward: Forward, action: Action, original: Callable, x, *args, **kwargs):
    """Bloom's FFN returns residual + contribution: a skipped position returns the residual plus the fill (the fill
    reads the residual as the stream h, for norm_ratio)."""
    residual = args[0] if args else kwargs["residual"]
    res_flat = residual.reshape(-1, residual.shape[-1])
    forward.check_rows(res_flat.shape[0], site.index)
    out = res_flat + action.filled(x.reshape(-1, x.shape[-1]), res_flat.shape[-1], res_flat)
    if action.kind is Kind.MASK:
        y = original(x, residual).reshape(res_flat.shape)
        out = torch.where(action.skip[:, None], out, y)
    elif action.kind is Kind.GATHER:
        x_flat = x.reshape(-1, x.shape[-1])
        y = original(x_flat.index_select(0, action.kept).unsqueeze(0),
                     res_flat.index_select(0, action.kept).unsqueeze(0))
        out = out.index_copy_(0, action.kept, y.reshape(-1, res_flat.shape[-1]))
    return out.view(residual.shape)


def patch_fc_pair(site: FFNSite, handle, patcher: Patcher, text: str) -> None:
    """OPT: fc1 drops skipped rows (an empty-width tensor when all skip), fc2 scatters them back into the fill."""
    fc1, fc2, layer = site.fc1, site.fc2, site.index
    fc1_forward, fc2_forward = fc1.forward, fc2.forward
    pending: dict[str, Any] = {}

    def fc1_wrapped(x):
        current: Forward | None = handle.forward
        action = pending["action"] = DENSE if current is None else current.action(layer)
        if action.kind is Kind.DENSE:
            return fc1_forward(x)
        current.check_rows(x.shape[0], layer)
        pending["input"] = x  # what a fill reads
        if action.kind is Kind.NARROW:
            return action.neurons.fc1(current, action, fc1_forward, x)
        if action.kind is Kind.SKIP_ALL:
            return x.new_empty((x.shape[0], 0))
        return fc1_forward(x if action.kind is Kind.MASK else x.index_select(0, action.kept))

    def fc2_wrapped(a):
        action = pending.pop("action", DENSE)
        if action.kind is Kind.DENSE:
            return fc2_forward(a)
        if action.kind is Kind.NARROW:
            return action.neurons.fc2(action, fc2_forward, a, pending.pop("input"))
        out = action.filled(pending.pop("input"), fc2.out_features).to(a.dtype)
        if action.kind is Kind.SKIP_ALL:
            return out
        y = fc2_forward(a)
        if action.kind is Kind.MASK:
            return torch.where(action.skip[:, None], out, y)
        return out.index_copy_(0, action.kept, y.to(out.dtype))

    patcher.set_attr(fc1, "forward", fc1_wrapped)
    patcher.set_attr(fc2, "forward", fc2_wrapped)
    patcher.describe(fc1, text + " (fc1 of the FFN pair)")
    patcher.describe(fc2, text + " (fc2 of the FFN pair)")
