"""What a patched FFN computes under each action, for FFN modules that return their contribution (most models;
Bloom and OPT: families.py).

A skipped FFN is not called: it returns a fresh tensor (zeros, or the plan's compensation). Under GATHER the FFN
runs on the kept positions only (gather -> ffn on ``[1, K, H]`` -> scatter); under MASK on every position, and the
skipped ones are replaced. Under NARROW (neuron plans) the FFN runs on its kept neurons (runtime/neurons.py).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..arch.registry import RESIDUAL_INSIDE, FFNSite, first_tensor
from .patcher import Patcher
from .schedule import DENSE, Action, Forward, Kind


def patch_ffn(site: FFNSite, handle, patcher: Patcher, text: str) -> None:
    """Replace the site's FFN forward(s); ``handle.forward`` (the SkipHandle's) is the Forward in progress (None: run
    dense)."""
    if site.ffn is None:
        from .families import patch_fc_pair

        patch_fc_pair(site, handle, patcher, text)
        return
    original = site.ffn.forward  # the bound class method (or an earlier instance forward, e.g. accelerate's)
    skip = _skip_module
    if site.contribution == RESIDUAL_INSIDE:
        from .families import skip_bloom as skip

    def forward(x, *args, **kwargs):
        current: Forward | None = handle.forward
        action = DENSE if current is None else current.action(site.index)
        if action.kind is Kind.DENSE:
            return original(x, *args, **kwargs)
        if action.kind is Kind.NARROW:
            return action.neurons.run(site, current, action, original, x, *args, **kwargs)
        return skip(site, current, action, original, x, *args, **kwargs)

    patcher.set_attr(site.ffn, "forward", forward)
    patcher.describe(site.ffn, text)


def _skip_module(site: FFNSite, forward: Forward, action: Action, original: Callable, x, *args, **kwargs):
    flat = x.reshape(-1, x.shape[-1])
    forward.check_rows(flat.shape[0], site.index)
    out = action.filled(flat, flat.shape[-1])
    if action.kind is Kind.MASK:
        y = first_tensor(original(x, *args, **kwargs)).reshape(flat.shape[0], -1)
        out = torch.where(action.skip[:, None], out, y)
    elif action.kind is Kind.GATHER:
        y = first_tensor(original(flat.index_select(0, action.kept).unsqueeze(0), *args, **kwargs))
        out = out.index_copy_(0, action.kept, y.reshape(-1, out.shape[-1]).to(out.dtype))
    return out.view(*x.shape[:-1], out.shape[-1])
