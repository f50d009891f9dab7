"""Serve a skip plan in vLLM: ``SKIPPROF_PLAN=plans/x.yaml vllm serve MODEL`` (or the same variable around
``vllm.LLM(...)``). Registered as a vLLM general plugin (``pip install "skipprofiler[vllm]"``); docs/deploy-vllm.md.

What it does, in every vLLM process the plugin is loaded in, and only while ``SKIPPROF_PLAN`` is set:

* front end (``EngineArgs.create_engine_config``): the plan is loaded, validated, checked against what vLLM serves
  (static plans, compensation none / mean_output / linear, no prompt classes), against the architecture registry
  (skipprofiler.arch.registry: a family whose FFN is the decoder layer's ``mlp`` module), against the model's
  fingerprint and its layers (skipprofiler.plan.io's checks), before any worker starts. The problems stop start-up
  with one line listing them all (``vllm serve``: the exit message; ``LLM(...)``: a ``PlanError`` whose message is
  that line).
* workers (``Worker.load_model``): after the weights load, the registry resolves vLLM's model as it resolves a
  transformers one (the same checks again, now against ``model_fingerprint`` of the built model), and each planned
  layer's ``mlp.forward`` becomes a call of
  the custom op ``skipprof::ffn`` (opaque to vLLM's torch.compile), and the model's forward is wrapped so that once
  per forward the decode index of every token is computed from tensors the model runner already holds on the
  device: ``d = positions - prompt_len[req_indices]``. Prompt tokens (d < 0), chunked-prefill chunks mixed with
  other requests' decode tokens included, run dense; a token with ``d >= warmup_tokens`` (and not a ``dense_every``
  token, and on a layer's ``fraction`` pattern) skips. No Python loop over tokens, no device-to-host copy.
* the op computes the FFN on the rows that need it: on CPU it gathers them (host memory: nothing to synchronise);
  on an accelerator it runs the FFN on every row and selects with the mask (fixed shapes: no sync, CUDA-graph
  safe, and no saving yet -- see docs/deploy-vllm.md).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from ..arch.registry import (REGISTRY, RESIDUAL_INSIDE, FFNSite, UnsupportedArchitecture, config_fingerprint,
                             model_fingerprint, resolve)
from ..plan.model import (ADAPTIVE, ALL_POSITIONS, LINEAR, MEAN_OUTPUT, NO_COMPENSATION, PlanError, PlanFile, SkipPlan,
                          fraction_pattern)

ENV = "SKIPPROF_PLAN"
SERVED = ("static plans (compensation none, mean_output or linear; apply_to decode or all) without prompt classes; "
          "adaptive, per-class and norm_ratio plans run in transformers (skipprofiler.apply_plan)")
FFN_MODULE = "mlp"  # the decoder-layer module whose forward the plugin routes through its op


def register() -> None:
    """The `vllm.general_plugins` entry point: vLLM calls it in every process; it does nothing without the switch."""
    if os.environ.get(ENV):
        _patch_front_end()
        _patch_workers()


# ---- the plan: what vLLM serves, checked before start-up --------------------------------------------------------


def family_problem(model_type: Any) -> str | None:
    """Why the plugin cannot serve the registry family `model_type` (None: it can). Its op replaces the output of
    each decoder layer's `mlp` module, as the runtime replaces the FFN module's output: the registry must know the
    family, its FFN must be that module, and the module's output must be the FFN's part only, used as is (Bloom's
    adds the residual itself; Falcon's layer writes into it, and vLLM's FalconMLP returns (output, bias))."""
    spec = REGISTRY.get(model_type)
    if spec is None:
        return "skipprofiler's architecture registry does not know it"
    if spec.ffn != FFN_MODULE:
        return f"its FFN is {spec.ffn!r}, not an {FFN_MODULE!r} module"
    if spec.contribution == RESIDUAL_INSIDE:
        return "its FFN module adds the residual itself"
    if spec.ffn_output_mutated:
        return "its layer changes the FFN output after the module returns"
    return None


def served_architectures() -> list[str]:
    """The model types (skipprofiler.arch.registry.REGISTRY keys) whose plans the plugin serves."""
    return sorted(t for t in REGISTRY if family_problem(t) is None)


def architecture_problem(hf_config: Any) -> str | None:
    """One sentence if the plugin cannot serve the model `hf_config` describes; None if its registry family is served
    (whether vLLM's decoder layers have the `mlp` module is checked on the worker, once vLLM has built the model)."""
    model_type = getattr(hf_config, "model_type", None)
    why = family_problem(model_type)
    if why is None:
        return None
    archs = ", ".join(getattr(hf_config, "architectures", None) or []) or "of unknown architecture"
    return (f"vLLM serves skip plans for the model types {', '.join(served_architectures())}; this model is "
            f"{model_type!r} ({archs}): {why}")


def load_served_plan(path: str) -> PlanFile:
    """The plan file at `path`, loaded and validated; PlanError with one line otherwise."""
    from ..plan import load_plan

    try:
        return load_plan(path)
    except PlanError as e:
        raise PlanError(f"{ENV}={path}: " + "; ".join(e.problems)) from None


def unserved_kind(plan_file: PlanFile) -> str | None:
    plan = plan_file.global_plan
    if plan_file.classes or plan_file.router is not None:
        return "it has prompt classes"
    if plan.mode == ADAPTIVE:
        return "it is adaptive"
    if plan.compensation not in (NO_COMPENSATION, MEAN_OUTPUT, LINEAR):
        return f"its compensation is {plan.compensation}"
    return None


def plan_problems(plan_file: PlanFile, hf_config: Any, model_fp: dict | None = None) -> list[str]:
    """Everything that keeps vLLM from serving `plan_file` on the model `hf_config` describes, all at once: the plan's
    kind, the architecture, the fingerprint (skipprofiler.plan.fingerprint_problems against `model_fp`, by default
    `config_fingerprint` of the config: what `model_fingerprint` gives the same checkpoint in transformers) and the
    plan rules against the model's layers (skip_plan_problems)."""
    from ..plan import fingerprint_problems, skip_plan_problems

    problems = []
    why = unserved_kind(plan_file)
    if why:
        problems.append(f"vLLM cannot serve this plan: {why} (vLLM serves {SERVED})")
    why = architecture_problem(hf_config)
    if why:
        problems.append(why)
    if model_fp is None:
        model_fp = config_fingerprint(hf_config, getattr(hf_config, "num_hidden_layers", None))
    mismatch = fingerprint_problems((plan_file.model or {}).get("fingerprint"), model_fp)
    if mismatch:
        name = (plan_file.model or {}).get("name", "?")
        problems.append(f"plan was fitted for another model ({name}): " + "; ".join(mismatch))
    layers, hidden = model_fp.get("num_layers"), model_fp.get("hidden_size")
    if layers:
        problems += skip_plan_problems(plan_file.global_plan, "global", layers, hidden)
    return problems


def problem_line(path: str | None, problems: list[str]) -> str | None:
    """The one line start-up stops with (None: nothing to report)."""
    return (f"{ENV}={path}: " if path else f"{ENV}: ") + "; ".join(problems) if problems else None


def plan_digest(path: str) -> str:
    """sha256 of the plan file (its linear maps' file is pinned inside it by sha256)."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _stop(line: str) -> None:
    """End start-up with one line: the server's exit message, or a PlanError for LLM(...) in a program."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if os.path.basename(sys.argv[0]) == "vllm" or (spec is not None and spec.name.startswith("vllm.")):
        raise SystemExit(f"skipprof: {line}")  # `vllm serve`, `python -m vllm.entrypoints.openai.api_server`
    raise PlanError(line)


def _patch_front_end() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_skipprof", False):
        return

    def create_engine_config(self, *args, **kwargs):
        path = os.environ.get(ENV)  # read per engine: a program may start several
        if not path:
            return original(self, *args, **kwargs)
        try:
            plan_file = load_served_plan(path)
        except PlanError as e:
            _stop(str(e))
        config = original(self, *args, **kwargs)
        problem = problem_line(path, plan_problems(plan_file, config.model_config.hf_config))
        if problem:
            _stop(problem)
        # vLLM keys its compiled-graph cache on the config: without the plan in it, a dense graph cached earlier
        # would be loaded and the plan silently not run (or a planned graph reused without the plugin).
        if not isinstance(config.additional_config, dict):
            _stop(f"{ENV}={path}: cannot record the plan in vLLM's additional_config "
                  f"({type(config.additional_config).__name__}); its compile cache would not tell plans apart")
        config.additional_config["skipprof_plan"] = plan_digest(path)
        return config

    create_engine_config._skipprof = True
    EngineArgs.create_engine_config = create_engine_config


# ---- the workers: patch the loaded model ---------------------------------------------------------------------------


def _patch_workers() -> None:
    from vllm.v1.worker.gpu_worker import Worker

    original = Worker.load_model
    if getattr(original, "_skipprof", False):
        return

    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        path = os.environ.get(ENV)
        if not path:
            return
        plan_file = load_served_plan(path)  # checked by the front end already: raises only if the file changed
        self.skipprof = ServedPlan(self.model_runner, plan_file, path)

    def skipprof_stats(self) -> dict[str, int] | None:
        """`llm.collective_rpc("skipprof_stats")`: counts since start-up (reads device counters: not per step)."""
        served = getattr(self, "skipprof", None)
        return None if served is None else served.stats()

    load_model._skipprof = True
    Worker.load_model = load_model
    Worker.skipprof_stats = skipprof_stats


_ACTIVE: ServedPlan | None = None  # the worker process's plan (one model per worker)


@torch.library.custom_op("skipprof::ffn", mutates_args=())
def _ffn_op(x: torch.Tensor, layer: int) -> torch.Tensor:
    return _ACTIVE.ffn(layer, x)


@_ffn_op.register_fake
def _(x: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(x)


class ServedPlan:
    """A static plan installed on a vLLM model: per forward the rows each layer skips, per planned layer the op."""

    def __init__(self, runner: Any, plan: PlanFile | SkipPlan, path: str | None = None):
        global _ACTIVE
        model = runner.get_model()
        sites = served_sites(model, path)
        fp = model_fingerprint(model)  # the model vLLM built, fingerprinted as transformers fingerprints it
        if isinstance(plan, PlanFile):
            problems = plan_problems(plan, model.config, fp)
            plan = plan.global_plan
        else:
            from ..plan import skip_plan_problems

            problems = skip_plan_problems(plan, "plan", len(sites), fp["hidden_size"])
        if problems:
            raise PlanError(problem_line(path, problems))
        self.runner, self.plan = runner, plan
        self.device = next(model.parameters()).device
        self.gather = self.device.type == "cpu"  # host memory: row counts are known without a sync
        self.ffns: dict[int, Any] = {}
        self.fills: dict[int, Any] = {}
        if plan.compensation != NO_COMPENSATION:
            from ..runtime.compensation import LinearFill, MeanFill

            for layer in plan.skip_layers:
                self.fills[layer] = (MeanFill(plan.ffn_mean[layer]) if plan.compensation == MEAN_OUTPUT
                                     else LinearFill(plan.linear, layer))
        for layer in sorted(plan.skip_layers):
            mlp = sites[layer].ffn
            self.ffns[layer] = mlp.forward
            mlp.forward = _planned(layer)
        # layers sharing a fraction share their rows: one mask per distinct fraction and forward
        self.fraction = {layer: float(f) for layer, f in plan.skip_layers.items()}
        self.rows: dict[float, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
        self._prompt_lens = None if self.gather else torch.zeros_like(
            runner.input_batch.num_prompt_tokens_cpu_tensor, device=self.device)
        self.counts = torch.zeros(4, dtype=torch.int64, device=self.device)  # forwards, prompt, decode, mixed
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.device)  # FFN rows skipped
        original_forward = model.forward

        def forward(*args, **kwargs):
            positions = kwargs["positions"] if "positions" in kwargs else args[1]
            self.prepare(positions)
            return original_forward(*args, **kwargs)

        model.forward = forward
        _ACTIVE = self

    def decode_index(self, positions: torch.Tensor) -> torch.Tensor:
        """plan.py's d per token of this forward: positions after the prompt (apply_to all: every position)."""
        if self.plan.apply_to == ALL_POSITIONS:
            return positions
        n, batch = positions.shape[0], self.runner.input_batch
        prompt_lens = batch.num_prompt_tokens_cpu_tensor
        if self._prompt_lens is not None:  # accelerator: vLLM keeps them pinned; copy as it does its own inputs
            prompt_lens = self._prompt_lens.copy_(prompt_lens, non_blocking=True)
        return positions - prompt_lens[self.runner.req_indices.gpu[:n]]

    def prepare(self, positions: torch.Tensor) -> None:
        """Once per forward: each fraction's skip mask (and, gathering, its kept and skipped rows)."""
        self.rows = {}
        d = self.decode_index(positions)
        for f, skip in fraction_masks(self.plan, d).items():
            if self.gather:
                self.rows[f] = (skip, (~skip).nonzero().flatten(), skip.nonzero().flatten())
            else:
                self.rows[f] = (skip, None, None)
            self.skipped += skip.sum() * sum(1 for g in self.fraction.values() if g == f)
        prompt = d < 0
        self.counts += torch.stack([torch.ones_like(self.skipped), prompt.sum(), (~prompt).sum(),
                                    (prompt.any() & (~prompt).any()).long()])

    def ffn(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        skip, kept, skipped = self.rows[self.fraction[layer]]
        original, fill = self.ffns[layer], self.fills.get(layer)
        if not self.gather:
            filled = torch.zeros_like(x) if fill is None else fill(x, x.shape[-1]).to(x.dtype)
            return torch.where(skip[:, None], filled, original(x))
        if skipped.numel() == 0:
            return original(x)
        out = x.new_zeros(x.shape) if fill is None else x.new_empty(x.shape)
        if kept.numel():
            out.index_copy_(0, kept, original(x.index_select(0, kept)))
        if fill is not None:
            rows = x.index_select(0, skipped)
            out.index_copy_(0, skipped, fill(rows, x.shape[-1]).to(x.dtype))
        return out

    def stats(self) -> dict[str, int]:
        forwards, prompt, decode, mixed = self.counts.tolist()
        return {"forwards": forwards, "prompt_tokens": prompt, "decode_tokens": decode, "mixed_forwards": mixed,
                "skipped_ffn_rows": int(self.skipped), "planned_layers": sorted(self.ffns)}


def served_sites(model: Any, path: str | None = None) -> list[FFNSite]:
    """The FFN sites of the model vLLM built, found by the registry (skipprofiler.arch.registry.resolve, as the
    runtime finds them in transformers): every decoder layer must have the `mlp` module the op wraps."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    why = family_problem(model_type)
    if why is None:
        try:
            return resolve(model).sites
        except UnsupportedArchitecture as e:
            why = str(e)
    raise PlanError(problem_line(path, [f"vLLM's {type(model).__name__} ({model_type!r}) cannot be served: {why}"]))


def fraction_masks(plan: SkipPlan, d: torch.Tensor) -> dict[float, torch.Tensor]:
    """Per distinct fraction of a static plan, which tokens of a forward skip (decode indices `d`, on the device):
    plan.py's rule, computed on the device without a host sync."""
    eligible = plan.eligible(d)
    return {f: eligible & fraction_pattern(f, d) for f in sorted(set(plan.skip_layers.values()))}


def _planned(layer: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.skipprof.ffn(x, layer)

    return forward
