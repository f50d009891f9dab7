"""Compensation for skipped FFNs (plan.py): ``norm_ratio`` returns (norm_gain - 1) * h, ``mean_output`` the mean,
``linear`` a fitted linear map of the FFN's input (skipprofiler.substitute fits it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..plan import LINEAR, MEAN_OUTPUT, NORM_RATIO, STATIC, LinearMaps, SkipPlan
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
    elif plan.compensation == LINEAR:
        problems += _linear_problems(plan, label, arch)
    return problems


def _linear_problems(plan: SkipPlan, label: str, arch: ResolvedArch) -> list[str]:
    from ..planio import linear_map_problems

    L = arch.num_layers
    if plan.linear is None or not plan.linear.tensors:
        return [f"{label}: compensation linear needs its fitted maps (load the plan from its file, beside which "
                "they are stored)"]
    skippable = sorted(plan.skip_layers) if plan.mode == STATIC else list(range(plan.cold_start, L - plan.cold_end))
    config = arch._config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return linear_map_problems(f"{label}: linear", plan.linear.tensors, plan.linear.rank, hidden, skippable)


class LinearSubstitute:
    """One layer's fitted map as tensors, converted once per device and dtype: ``x @ W + b`` or ``(x @ D) @ U + b``."""

    def __init__(self, maps: LinearMaps, layer: int):
        self._arrays = maps.layer_tensors(layer)
        self._converted: dict[tuple[str, torch.dtype], dict[str, torch.Tensor]] = {}
        self.flops_per_row = maps.flops_per_call(int(self._arrays["bias"].shape[0]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (str(x.device), x.dtype)
        t = self._converted.get(key)
        if t is None:
            t = self._converted[key] = {k: torch.from_numpy(v).to(device=x.device, dtype=x.dtype)
                                        for k, v in self._arrays.items()}
        if "weight" in t:
            return torch.addmm(t["bias"], x, t["weight"])
        return torch.addmm(t["bias"], x @ t["down"], t["up"])


class Compensation:
    """Fills each forward's Step with what skipped FFNs of compensating plans contribute. The fills depend only on
    which plan each row follows (and the forward's width), so they are built once per combination and reused: a
    decode step costs one dictionary lookup."""

    def __init__(self, arch: ResolvedArch, skip_layers: set[int], ctx: Any, patcher: Patcher,
                 norm_ratio: bool):
        self.arch, self.skip_layers = arch, skip_layers
        self._means: dict[tuple[int, int, str], torch.Tensor] = {}  # converted once per plan, layer and device
        self._substitutes: dict[tuple[int, int], LinearSubstitute] = {}  # per plan and layer
        self._fills: dict[tuple, tuple] = {}  # (row plans, seq, device) -> the step's fill fields
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
        key = (tuple(id(rp.plan) for rp in plans), step.seq, str(step.device))
        fills = self._fills.get(key)
        if fills is None:
            if len(self._fills) > 256:  # many batch shapes: keep the memo bounded
                self._fills.clear()
            fills = self._fills[key] = self._build(step, plans)
        step.mean_fill, step.linear_fill, step.gain_scale = fills

    def _build(self, step: Step, plans: list[RowPlan]) -> tuple:
        mean_fill: dict[int, torch.Tensor] = {}
        linear_fill: dict[int, list] = {}
        gain_scale: list = []
        if any(rp.plan.compensation == MEAN_OUTPUT for rp in plans):
            self._mean_fill(step, plans, mean_fill)
        if any(rp.plan.compensation == LINEAR for rp in plans):
            self._linear_fill(step, plans, linear_fill)
        if any(rp.plan.compensation == NORM_RATIO for rp in plans):
            mult = self.arch.sites[0].multiplier
            gain_scale = [None] * self.arch.num_layers
            for layer in self.skip_layers:
                per_row = [(rp.plan.norm_gain[layer] - 1.0) / mult if rp.plan.compensation == NORM_RATIO else 0.0
                           for rp in plans]
                if len(set(per_row)) == 1:
                    gain_scale[layer] = per_row[0]
                else:
                    per_position = [v for v in per_row for _ in range(step.seq)]
                    gain_scale[layer] = torch.tensor(per_position, device=step.device)[:, None]
        return mean_fill, linear_fill, gain_scale

    def _linear_fill(self, step: Step, plans: list[RowPlan], into: dict[int, list]) -> None:
        """Per skippable layer: [(substitute, None)] when every row uses the same map, else one (substitute,
        position mask) per distinct map (rows of other plans get zeros)."""
        for layer in self.skip_layers:
            per_row = [self._substitute(rp.plan, layer) for rp in plans]
            if all(m is per_row[0] for m in per_row):
                if per_row[0] is not None:
                    into[layer] = [(per_row[0], None)]
                continue
            groups = []
            for m in {id(m): m for m in per_row if m is not None}.values():
                flags = [r is m for r in per_row for _ in range(step.seq)]
                groups.append((m, torch.tensor(flags, device=step.device)))
            into[layer] = groups

    def _substitute(self, plan: SkipPlan, layer: int) -> LinearSubstitute | None:
        if plan.compensation != LINEAR or plan.linear is None or layer not in plan.linear.layers:
            return None
        key = (id(plan), layer)
        if key not in self._substitutes:
            self._substitutes[key] = LinearSubstitute(plan.linear, layer)
        return self._substitutes[key]

    def _mean_fill(self, step: Step, plans: list[RowPlan], into: dict[int, torch.Tensor]) -> None:
        """Per skippable layer, the mean output each row's plan substitutes (zeros for rows without mean_output)."""
        for layer in self.skip_layers:
            per_row = [self._mean(rp.plan, layer, step.device) for rp in plans]
            if all(v is per_row[0] for v in per_row):
                if per_row[0] is not None:
                    into[layer] = per_row[0]
                continue
            hidden = next(v.shape[0] for v in per_row if v is not None)
            rows = [v if v is not None else torch.zeros(hidden, device=step.device) for v in per_row]
            into[layer] = torch.stack(rows).repeat_interleave(step.seq, dim=0)

    def _mean(self, plan: SkipPlan, layer: int, device: torch.device) -> torch.Tensor | None:
        if plan.compensation != MEAN_OUTPUT or not plan.ffn_mean or layer not in plan.ffn_mean:
            return None
        key = (id(plan), layer, str(device))
        if key not in self._means:
            self._means[key] = torch.tensor(plan.ffn_mean[layer], dtype=torch.float32, device=device)
        return self._means[key]
