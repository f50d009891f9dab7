"""Compensation for skipped FFNs (plan.py), as fills the schedule hands to skipped FFN calls: ``mean_output`` the
calibrated mean, ``linear`` a fitted linear map of the FFN's input (skipprofiler.fit.substitute fits it), ``norm_ratio``
(norm_gain - 1) * h. Imported only for plans that compensate."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..plan.model import LINEAR, MEAN_OUTPUT, NORM_RATIO, LinearMaps, SkipPlan
from ..arch.registry import RESIDUAL_INSIDE, FFNSite, ResolvedArch
from .patcher import Patcher

# Pre-FFN norms, by attribute name on the decoder layer: their input is h, needed by `compensation: norm_ratio`.
PRE_FFN_NORMS = ("post_attention_layernorm", "ln_2", "final_layer_norm")
# Residual forms where a skipped FFN can return `(gain - 1) * h` as its contribution.
COMPENSABLE_FORMS = ("sequential", RESIDUAL_INSIDE)


def pre_ffn_norm(site: FFNSite) -> nn.Module | None:
    for name in PRE_FFN_NORMS:
        module = getattr(site.layer, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def compensation_problems(plan: SkipPlan, label: str, arch: ResolvedArch) -> list[str]:
    """What this architecture cannot do for the plan's compensation (the plan's own rules are the plan stage's)."""
    problems = []
    if plan.compensation == NORM_RATIO:
        form = arch.residual_form
        if form not in COMPENSABLE_FORMS:
            problems.append(f"{label}: compensation norm_ratio is not supported for {arch.model_type} "
                            f"(residual form {form!r}; supported: {', '.join(COMPENSABLE_FORMS)}); "
                            "use compensation: none")
        elif form == "sequential" and any(pre_ffn_norm(s) is None for s in arch.sites):
            problems.append(f"{label}: compensation norm_ratio needs the pre-FFN norm ({', '.join(PRE_FFN_NORMS)}) "
                            f"but {arch.model_type} layers have none of these")
    elif plan.compensation == MEAN_OUTPUT and any(site.contribution == RESIDUAL_INSIDE for site in arch.sites):
        problems.append(f"{label}: compensation mean_output is not supported for {arch.model_type} (its FFN "
                        "adds the residual itself); use compensation: none")
    elif plan.compensation == LINEAR:
        from ..plan import linear_map_problems

        if plan.linear is None:
            return []  # plan validation said the maps are required
        if not plan.linear.tensors:
            return [f"{label}: compensation linear needs its fitted maps (load the plan from its file, beside which "
                    "they are stored)"]
        skippable = plan.skippable_layers(arch.num_layers)
        hidden = getattr(arch._config, "hidden_size", None) or getattr(arch._config, "n_embd", None)
        problems += linear_map_problems(f"{label}: linear", plan.linear.tensors, plan.linear.rank, hidden, skippable)
    return problems


class LinearFill:
    """One layer's fitted map, converted once per device and dtype: ``x @ W + b`` or ``(x @ D) @ U + b``."""

    def __init__(self, maps: LinearMaps, layer: int):
        self._arrays = maps.layer_tensors(layer)
        self._converted: dict[tuple[str, torch.dtype], dict[str, torch.Tensor]] = {}
        self.flops_per_row = maps.flops_per_call(int(self._arrays["bias"].shape[0]))
        self.extra_elements = int(sum(v.size for v in self._arrays.values()))  # numbers held beside the model

    def __call__(self, x: torch.Tensor, hidden: int, stream: torch.Tensor | None = None) -> torch.Tensor:
        key = (str(x.device), x.dtype)
        t = self._converted.get(key)
        if t is None:
            t = self._converted[key] = {k: torch.from_numpy(v).to(device=x.device, dtype=x.dtype)
                                        for k, v in self._arrays.items()}
        if "weight" in t:
            return torch.addmm(t["bias"], x, t["weight"])
        return torch.addmm(t["bias"], x @ t["down"], t["up"])


class MeanFill:
    """The calibrated mean FFN output: a constant vector, no FFN work."""

    flops_per_row = 0.0

    def __init__(self, mean: list[float]):
        self._mean, self._converted = mean, {}

    def __call__(self, x: torch.Tensor, hidden: int, stream: torch.Tensor | None = None) -> torch.Tensor:
        mean = self._converted.get(str(x.device))
        if mean is None:
            mean = self._converted[str(x.device)] = torch.tensor(self._mean, dtype=torch.float32, device=x.device)
        return mean.to(x.dtype).expand(x.shape[0], hidden).clone()


class NormRatioFill:
    """``(norm_gain - 1) * h / multiplier``, h being the stream entering the FFN sub-block (read by a pre-norm hook;
    Bloom hands its residual in as `stream`)."""

    flops_per_row = 0.0

    def __init__(self, scale: float, streams: dict[int, torch.Tensor], layer: int):
        self.scale, self._streams, self._layer = scale, streams, layer

    def __call__(self, x: torch.Tensor, hidden: int, stream: torch.Tensor | None = None) -> torch.Tensor:
        h = stream if stream is not None else self._streams[self._layer]
        return (h.reshape(x.shape[0], -1) * self.scale).to(x.dtype)


def fills_for(plan: SkipPlan, layers: list[int], arch: ResolvedArch, patcher: Patcher,
              streams: dict[int, torch.Tensor]) -> dict[int, Any]:
    """Per layer the plan may skip, what fills in for its FFN. norm_ratio hooks the pre-FFN norms once per handle
    (`streams`, shared by the handle's plans, holds each layer's latest h)."""
    if plan.compensation == MEAN_OUTPUT:
        return {l: MeanFill(plan.ffn_mean[l]) for l in layers}
    if plan.compensation == LINEAR:
        return {l: LinearFill(plan.linear, l) for l in layers if l in plan.linear.layers}
    if plan.compensation != NORM_RATIO:
        return {}
    mult = arch.sites[0].multiplier
    for layer in layers:
        site = arch.sites[layer]
        if layer not in streams and site.contribution != RESIDUAL_INSIDE:
            streams[layer] = None
            patcher.hook(pre_ffn_norm(site).register_forward_pre_hook(_keep_stream(streams, layer)))
    return {l: NormRatioFill((plan.norm_gain[l] - 1.0) / mult, streams, l) for l in layers}


def _keep_stream(streams: dict[int, torch.Tensor], layer: int):
    def hook(module, args):
        streams[layer] = args[0].reshape(-1, args[0].shape[-1])

    return hook
