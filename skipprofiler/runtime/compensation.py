"""Compensation for skipped FFNs (plan.py): ``norm_ratio`` returns (norm_gain - 1) * h, ``mean_output`` the mean."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..plan import MEAN_OUTPUT, NORM_RATIO, STATIC, SkipPlan
from ..registry import RESIDUAL_INSIDE, FFNSite, ResolvedArch
from .patcher import Patcher
from .schedule import RowPlan
from .step import Step

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
    L, problems = arch.num_layers, []
    if plan.compensation == NORM_RATIO:
        if plan.norm_gain is None or len(plan.norm_gain) != L:
            n = None if plan.norm_gain is None else len(plan.norm_gain)
            problems.append(f"{label}: compensation norm_ratio needs norm_gain for each of the {L} layers, got {n}")
        form = arch.residual_form
        if form not in COMPENSABLE_FORMS:
            problems.append(f"{label}: compensation norm_ratio is not supported for {arch.model_type} "
                            f"(residual form {form!r}; supported: {', '.join(COMPENSABLE_FORMS)}); "
                            "use compensation: none")
        elif form == "sequential" and any(pre_ffn_norm(s) is None for s in arch.sites):
            problems.append(f"{label}: compensation norm_ratio needs the pre-FFN norm ({', '.join(PRE_FFN_NORMS)}) "
                            f"but {arch.model_type} layers have none of these")
    elif plan.compensation == MEAN_OUTPUT:
        skippable = sorted(plan.skip_layers) if plan.mode == STATIC else list(range(plan.cold_start, L - plan.cold_end))
        missing = [l for l in skippable if l not in (plan.ffn_mean or {})]
        if missing:
            problems.append(f"{label}: compensation mean_output needs ffn_mean for every layer it may skip; "
                            f"missing {missing}")
        if any(site.contribution == RESIDUAL_INSIDE for site in arch.sites):
            problems.append(f"{label}: compensation mean_output is not supported for {arch.model_type} (its FFN "
                            "adds the residual itself); use compensation: none")
    return problems


class Compensation:
    """Fills each forward's Step with what skipped FFNs of compensating plans contribute."""

    def __init__(self, arch: ResolvedArch, skip_layers: set[int], ctx: Any, patcher: Patcher,
                 norm_ratio: bool):
        self.arch, self.skip_layers = arch, skip_layers
        self._means: dict[tuple[int, int, str], torch.Tensor] = {}  # converted once per plan, layer and device
        if norm_ratio:  # h is the input of the pre-FFN norm (Bloom's FFN receives it as its residual)
            for site in arch.sites:
                if site.index in skip_layers and site.contribution != RESIDUAL_INSIDE:
                    patcher.hook(pre_ffn_norm(site).register_forward_pre_hook(self._capture(ctx, site.index)))

    @staticmethod
    def _capture(ctx: Any, layer: int):
        def hook(module, args):
            step = ctx.step
            if step is not None and step.active:
                step.ffn_input_stream[layer] = args[0].reshape(-1, args[0].shape[-1])

        return hook

    def plan_step(self, step: Step, plans: list[RowPlan]) -> None:
        if any(rp.plan.compensation == MEAN_OUTPUT for rp in plans):
            self._mean_fill(step, plans)
        if not any(rp.plan.compensation == NORM_RATIO for rp in plans):
            return
        mult = self.arch.sites[0].multiplier
        step.gain_scale = [None] * self.arch.num_layers
        for layer in self.skip_layers:
            per_row = [(rp.plan.norm_gain[layer] - 1.0) / mult if rp.plan.compensation == NORM_RATIO else 0.0
                       for rp in plans]
            if len(set(per_row)) == 1:
                step.gain_scale[layer] = per_row[0]
            else:
                per_position = [v for v in per_row for _ in range(step.seq)]
                step.gain_scale[layer] = torch.tensor(per_position, device=step.device)[:, None]

    def _mean_fill(self, step: Step, plans: list[RowPlan]) -> None:
        """Per skippable layer, the mean output each row's plan substitutes (zeros for rows without mean_output)."""
        for layer in self.skip_layers:
            per_row = [self._mean(rp.plan, layer, step.device) for rp in plans]
            if all(v is per_row[0] for v in per_row):
                if per_row[0] is not None:
                    step.mean_fill[layer] = per_row[0]
                continue
            hidden = next(v.shape[0] for v in per_row if v is not None)
            rows = [v if v is not None else torch.zeros(hidden, device=step.device) for v in per_row]
            step.mean_fill[layer] = torch.stack(rows).repeat_interleave(step.seq, dim=0)

    def _mean(self, plan: SkipPlan, layer: int, device: torch.device) -> torch.Tensor | None:
        if plan.compensation != MEAN_OUTPUT or not plan.ffn_mean or layer not in plan.ffn_mean:
            return None
        key = (id(plan), layer, str(device))
        if key not in self._means:
            self._means[key] = torch.tensor(plan.ffn_mean[layer], dtype=torch.float32, device=device)
        return self._means[key]
