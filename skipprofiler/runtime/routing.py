"""``prompt_class="auto"``, a runtime plug-in: route each row to a class plan by its prompt (nearest centroid of the
mean hidden state after ``router.layer``, pooled as ``router.pooling`` says; skipprofiler.arch.pooling, which the profile
recorder pools its document features with).

When the prompt runs dense (``apply_to: decode``) the router reads the layer output on the way; otherwise a dense
pre-pass without the cache runs up to the router layer and is stopped there by raising `RoutingDone`.
"""

from __future__ import annotations


import torch

from ..arch.compat import without_cache
from ..plan.model import PlanFile, SkipPlan
from ..arch.registry import ResolvedArch, first_tensor
from ..arch.pooling import pool, prompt_weights
from .plugins import Plugin


class RoutingDone(Exception):
    """Stops the routing pre-pass once the router layer has run."""


def router_problems(plan_file: PlanFile, arch: ResolvedArch,
                    hidden_size: int | None) -> tuple[dict[str | None, SkipPlan], list[str]]:
    """The global plan and every routed class plan, and what keeps the router from working on this model."""
    router = plan_file.router
    if router is None:
        from ..plan.model import PlanError

        known = ", ".join(sorted(plan_file.classes)) or "none"
        raise PlanError(f"prompt_class='auto' needs a plan with a router, and this plan has none; "
                        f"pass one of its classes ({known}) or None for the global plan")
    plans: dict[str | None, SkipPlan] = {None: plan_file.global_plan}
    problems = []
    for name in router.classes:
        if name not in plan_file.classes:
            problems.append(f"router class {name!r} has no class plan (plan classes: "
                            f"{', '.join(sorted(plan_file.classes)) or 'none'})")
        else:
            plans[name] = plan_file.classes[name]
    if not 0 <= router.layer < arch.num_layers:
        problems.append(f"router.layer {router.layer} is outside the model's {arch.num_layers} layers")
    if len(router.centroids) != len(router.classes):
        problems.append(f"router has {len(router.classes)} classes but {len(router.centroids)} centroids")
    dims = {len(c) for c in router.centroids}
    if hidden_size is not None and dims and dims != {hidden_size}:
        problems.append(f"router centroids have dimension {sorted(dims)}, the model's hidden size is {hidden_size}")
    return plans, problems


class RoutingPlugin(Plugin):
    """Chooses each row's class at its prompt; the handle reads them from ``handle.row_classes``."""

    def __init__(self, handle, plan_file: PlanFile, prompt_runs_dense: bool):
        self.handle, self.router = handle, plan_file.router
        self.prompt_runs_dense = prompt_runs_dense  # every plan keeps prompts dense: read the router layer on the way
        self._weights: torch.Tensor | None = None  # [B, S] pooling weights of the prompt, while routing a forward
        self._has_prompt: list[bool] = []  # per row: the forward holds prompt tokens
        layer = handle.arch.sites[self.router.layer].layer
        handle.patcher.hook(layer.register_forward_hook(self._layer_done))

    def before(self, module, args, kwargs, *, ref, mask, past, prompt_end, teacher_forced) -> None:
        """Choose row classes for this forward's prompt tokens (all positions, or those before decode_from's start)."""
        if not (teacher_forced or past == 0):
            return
        batch, seq, device = ref.shape[0], ref.shape[1], ref.device
        weights = (torch.ones(batch, seq, device=device) if mask is None or mask.shape[1] < seq
                   else mask[:, -seq:].float())
        if teacher_forced:
            cols = torch.arange(seq, device=device) + past
            starts = torch.tensor(prompt_end, device=device)
            weights = weights * (cols[None, :] < starts[:, None])
        self._weights = prompt_weights(weights, self.router.pooling, starts_sequence=past == 0)
        self._has_prompt = (self._weights.sum(1) > 0).tolist()  # a row with nothing to pool keeps the global plan
        if self.prompt_runs_dense and not teacher_forced:
            return  # the router layer's output is read during this very forward
        self.passive = True  # a dense pre-pass without the cache, stopped after the router layer
        try:
            with torch.no_grad():
                module(*args, **without_cache(kwargs))
        except RoutingDone:
            pass
        finally:
            self.passive = False

    def _layer_done(self, module, args, out):
        weights, self._weights = self._weights, None
        if weights is None:
            return None
        pooled = pool(first_tensor(out), weights)
        centroids = torch.tensor(self.router.centroids, dtype=torch.float32, device=pooled.device)
        normalize = torch.nn.functional.normalize
        best = (normalize(pooled, dim=-1) @ normalize(centroids, dim=-1).T).argmax(-1).tolist()
        self.handle.row_classes = [self.router.classes[i] if ok else None for i, ok in zip(best, self._has_prompt)]
        if self.passive:
            raise RoutingDone()
        return None
