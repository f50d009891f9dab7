"""``prompt_class="auto"``: route each row to a class plan by its prompt (nearest centroid of the mean hidden state
after ``router.layer``, pooled as ``router.pooling`` says). The runtime imports it only for ``prompt_class="auto"``;
the profile recorder pools its document features with the same `prompt_weights` and `pool`.

When the prompt runs dense (``apply_to: decode``) the router reads the layer output on the way; otherwise a dense
pre-pass without the cache runs up to the router layer and is stopped there by raising `RoutingDone`.
"""

from __future__ import annotations


import torch

from .._compat import without_cache
from ..plan import PlanFile, SkipPlan
from ..registry import ResolvedArch, first_tensor
from .patcher import Patcher


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


class RoutingDone(Exception):
    """Stops the routing pre-pass once the router layer has run."""


def router_problems(plan_file: PlanFile, arch: ResolvedArch,
                    hidden_size: int | None) -> tuple[dict[str | None, SkipPlan], list[str]]:
    """The global plan and every routed class plan, and what keeps the router from working on this model."""
    router = plan_file.router
    if router is None:
        from ..plan import PlanError

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


class PromptRouter:
    def __init__(self, plan_file: PlanFile, arch: ResolvedArch, patcher: Patcher):
        self.router = plan_file.router
        self.row_classes: list[str | None] | None = None  # per row of the last routed prompt
        self.prepass = False  # inside the dense routing pre-pass
        self._weights: torch.Tensor | None = None  # [B, S] pooling weights of the prompt, while routing a forward
        self._has_prompt: list[bool] = []  # per row: the forward holds prompt tokens
        patcher.hook(arch.sites[self.router.layer].layer.register_forward_hook(self._layer_done))

    def route(self, module, args: tuple, kwargs: dict, mask: torch.Tensor | None, batch: int, seq: int, past: int,
              device: torch.device, decode_start: list[int] | None, prompt_runs_dense: bool) -> None:
        """Choose row classes for this forward's prompt tokens (all positions, or those before decode_start)."""
        weights = (torch.ones(batch, seq, device=device) if mask is None or mask.shape[1] < seq
                   else mask[:, -seq:].float())
        if decode_start is not None:
            cols = torch.arange(seq, device=device) + past
            starts = torch.tensor(decode_start, device=device)
            weights = weights * (cols[None, :] < starts[:, None])
        self._weights = prompt_weights(weights, self.router.pooling, starts_sequence=past == 0)
        self._has_prompt = (self._weights.sum(1) > 0).tolist()  # a row with nothing to pool keeps the global plan
        if prompt_runs_dense:
            return  # the router layer's output is read during this very forward
        self.prepass = True
        try:
            with torch.no_grad():
                module(*args, **without_cache(kwargs))
        except RoutingDone:
            pass
        finally:
            self.prepass = False

    def _layer_done(self, module, args, out):
        weights, self._weights = self._weights, None
        if weights is None:
            return None
        pooled = pool(first_tensor(out), weights)
        centroids = torch.tensor(self.router.centroids, dtype=torch.float32, device=pooled.device)
        normalize = torch.nn.functional.normalize
        best = (normalize(pooled, dim=-1) @ normalize(centroids, dim=-1).T).argmax(-1).tolist()
        self.row_classes = [self.router.classes[i] if ok else None for i, ok in zip(best, self._has_prompt)]
        if self.prepass:
            raise RoutingDone()
        return None
