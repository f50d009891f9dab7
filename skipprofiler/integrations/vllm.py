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
* neuron plans (``neurons``): the layers with subsets keep their projections' weights as plain [out, in] tensors (on
  CPU vLLM would otherwise replace them by a oneDNN / sgl packed copy, which no view can slice: the plugin marks
  those projections before vLLM processes the loaded weights, so they run ``F.linear`` on the weight as loaded); after
  loading, each such FFN's neurons are permuted in place so the kept ones come first (rows of both halves of
  ``gate_up_proj``, columns of ``down_proj``: the dense function is unchanged, nothing is copied), and a narrowed
  row runs the module's own forward on a twin of the module whose projections compute on the first k neurons (plus
  the mean bias of ``fill: mean``, and with ``fill: map`` the rank-r map of the kept activations): the transformers
  runtime's reparametrisation (skipprofiler.runtime.neurons). On CPU each such projection is then packed by vLLM's
  own GEMM dispatch in two parts, kept and dropped neurons (`Narrowed._pack`).
* once per step, from the counts the model runner holds on the host (per request its computed tokens and prompt
  length, per token its request and place in the step: what vLLM computes positions from), the plugin decides per
  group of planned layers whether every row of the coming forward skips (or is narrowed, or runs the whole FFN): then
  only that is computed for all rows -- a layer every row skips reads none of its FFN weights (zeros, or the
  substitute: mean output, linear map). On CPU the decision stays inside vLLM's compiled graph: each planned layer is
  traced as a ``torch.cond`` on per-group flags in host memory (set before each forward), whose branches are the
  module's own forward (compiled with the rest of the graph, as without a plan), the substitute, the kept neurons, and
  the op ``skipprof::ffn_rows``; one graph for every state (``SKIPPROF_VLLM_IN_GRAPH=0``: the op for every call, as
  before). Only a forward whose rows differ (prompt tokens beside decode tokens, a fraction's pattern that differs
  between requests, warm-up) needs per-row masks: on CPU the op gathers the rows (host memory: nothing to
  synchronise) -- full rows, narrowed rows, skipped rows; on an accelerator it runs the FFN on every row (and the
  narrowed FFN on every row) and selects with the masks (fixed shapes, no sync).
* CUDA graphs: a host decision must not be baked into a captured graph that is replayed in another state. The op is
  added to vLLM's splitting ops and full graphs are turned off (cudagraph_mode PIECEWISE), so the op runs eagerly
  between the captured pieces at every step; a forward under capture never uses a host decision (it takes the mask
  branch, right in every state). docs/deploy-vllm.md has the reasoning and what is untested without a GPU.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import torch
import torch.nn.functional as F

from ..arch.registry import (OUTPUT_PROJECTIONS, REGISTRY, RESIDUAL_INSIDE, FFNSite, UnsupportedArchitecture,
                             config_fingerprint, model_fingerprint, resolve)
from ..plan.model import (ADAPTIVE, ALL_POSITIONS, LINEAR, MEAN_OUTPUT, NO_COMPENSATION, PlanError, PlanFile, SkipPlan,
                          fraction_pattern)

ENV = "SKIPPROF_PLAN"
SERVED = ("static plans (compensation none, mean_output or linear; apply_to decode or all; neuron subsets) without "
          "prompt classes; adaptive, per-class and norm_ratio plans run in transformers (skipprofiler.apply_plan)")
FFN_MODULE = "mlp"  # the decoder-layer module whose forward the plugin routes through its op
OP = "skipprof::ffn"
# "select": the accelerator's branch (run every row every way, select with masks) on CPU tensors too -- how tests run
# the accelerator's code on CPU; "gather": CPU's. Unset: gather on CPU, select elsewhere. Read when a worker loads.
PATH_ENV = "SKIPPROF_VLLM_PATH"
IN_GRAPH_ENV = "SKIPPROF_VLLM_IN_GRAPH"  # "0": no branches in the compiled graph (every planned layer via the op)
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
AOT_ENV = "VLLM_USE_AOT_COMPILE"
# what a group of planned layers computes in one forward, decided on the host (MIXED: per-row masks)
FULL, SKIP, NARROW, MIXED = "full", "skip", "narrow", "mixed"


def register() -> None:
    """The `vllm.general_plugins` entry point: vLLM calls it in every process; it does nothing without the switch."""
    if os.environ.get(ENV):
        _patch_front_end()
        _patch_workers()
        _patch_weight_packing()


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
    from ..plan import fingerprint_problems, neuron_problems, skip_plan_problems

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
    problems += neuron_problems(plan_file.global_plan, intermediate_size(hf_config), hidden, "global")
    return problems


def intermediate_size(hf_config: Any) -> int | None:
    """The FFN width of the model `hf_config` describes (None: the config does not say)."""
    for key in ("intermediate_size", "n_inner", "ffn_dim"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int):
            return value
    n_embd = getattr(hf_config, "n_embd", None)  # GPT-2: n_inner None means 4 * n_embd
    return 4 * n_embd if isinstance(n_embd, int) and getattr(hf_config, "model_type", None) == "gpt2" else None


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
        from vllm.platforms import current_platform

        try:
            runner = v1_runner_problem() or aot_compile_problem(current_platform.is_cpu())
        except PlanError as e:  # a malformed SKIPPROF_VLLM_* variable: one line before any worker starts
            _stop(problem_line(path, e.problems))
        if runner:
            _stop(problem_line(path, [runner]))
        config = original(self, *args, **kwargs)
        problem = problem_line(path, plan_problems(plan_file, config.model_config.hf_config))
        if problem:
            _stop(problem)
        eager_op_in_graphs(config.compilation_config)
        # vLLM keys its compiled-graph cache on the config: without the plan in it, a dense graph cached earlier
        # would be loaded and the plan silently not run (or a planned graph reused without the plugin).
        if not isinstance(config.additional_config, dict):
            _stop(f"{ENV}={path}: cannot record the plan in vLLM's additional_config "
                  f"({type(config.additional_config).__name__}); its compile cache would not tell plans apart")
        config.additional_config["skipprof_plan"] = plan_digest(path)
        return config

    create_engine_config._skipprof = True
    EngineArgs.create_engine_config = create_engine_config


def v1_runner_problem() -> str | None:
    """The plugin reads the V1 model runner's host buffers (vLLM 0.32 picks its V2 runner on GPUs with Triton): it
    asks for V1 (``VLLM_USE_V2_MODEL_RUNNER=0``, inherited by the engine's processes) unless told otherwise, and
    refuses to start if V2 was asked for."""
    value = os.environ.get(V2_RUNNER_ENV)
    if value is None:
        os.environ[V2_RUNNER_ENV] = "0"
        return None
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return (f"{V2_RUNNER_ENV}={value}: the plugin serves plans with vLLM's V1 model runner only (unset it, or "
                "set it to 0)")
    return None


def aot_compile_problem(cpu: bool) -> str | None:
    """Where the compiled graph branches on the host decision (CPU, `in_graph`), the graph reads tensors from the
    plugin's objects (the branch flags, the packed GEMMs' oneDNN handles). vLLM's AOT compile cache would save them
    into an artifact that the next start loads, bound to the first process's objects (measured: a later start's
    worker died at its first step). The plugin turns it off (``VLLM_USE_AOT_COMPILE=0``, inherited by the engine's
    processes: every start traces and compiles) unless told otherwise, and refuses to start if it was asked for. The
    workers decide the branches with the same functions (`gathers`, `in_graph`)."""
    if not cpu or not in_graph(gathers(torch.device("cpu"))):
        return None
    value = os.environ.get(AOT_ENV)
    if value is None:
        os.environ[AOT_ENV] = "0"
        return None
    if value.strip() == "1":
        return (f"{AOT_ENV}=1: vLLM's AOT compile cache would bind the compiled plan's branches to another process's "
                f"objects (unset it, set it to 0, or {IN_GRAPH_ENV}=0 to route every planned layer through the op)")
    return None


def eager_op_in_graphs(compilation_config: Any) -> None:
    """Keep the op out of every captured CUDA graph, so that its per-forward host decision is taken at every step:
    with vLLM's compilation the op becomes a splitting op (it runs eagerly between piecewise graphs) and full graphs
    (FULL, FULL_DECODE_ONLY, FULL_AND_PIECEWISE) become PIECEWISE. No graphs (CPU, enforce_eager): nothing to do.
    Graphs without vLLM's compilation (full graphs over an eager model) are left as they are: their capture records
    the op's mask branch, right in every state and saving nothing (ServedPlan.prepare never decides under capture)."""
    from vllm.config import CompilationMode, CUDAGraphMode

    cc = compilation_config
    if cc.cudagraph_mode == CUDAGraphMode.NONE or cc.mode != CompilationMode.VLLM_COMPILE:
        return
    if cc.splitting_ops is None:
        cc.splitting_ops = []
    if OP not in cc.splitting_ops:
        cc.splitting_ops.append(OP)
    if cc.cudagraph_mode.has_full_cudagraphs():
        cc.cudagraph_mode = CUDAGraphMode.PIECEWISE


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


def neuron_layers(path: str | None) -> set[int]:
    """The layers whose FFN the plan at `path` narrows (empty: no neuron subsets, or no plan)."""
    if not path:
        return set()
    if path not in _NEURON_LAYERS:
        subsets = load_served_plan(path).global_plan.neurons
        _NEURON_LAYERS[path] = set(subsets.layers) if subsets is not None else set()
    return _NEURON_LAYERS[path]


_NEURON_LAYERS: dict[str, set[int]] = {}
_PROJECTION = re.compile(r"(?:^|\.)(\d+)\." + FFN_MODULE + r"\.([A-Za-z0-9_]+)$")


def keeps_plain_weight(prefix: str, layers: set[int]) -> bool:
    """Whether the vLLM linear layer named `prefix` ("model.layers.3.mlp.gate_up_proj") is a projection of a narrowed
    FFN, whose weight must stay a plain tensor (views of its first k neurons)."""
    from ..runtime.neurons import FUSED_IN_PROJECTIONS, IN_PROJECTIONS

    match = _PROJECTION.search(prefix or "")
    return bool(match) and int(match.group(1)) in layers and (
        match.group(2) in IN_PROJECTIONS | FUSED_IN_PROJECTIONS | OUTPUT_PROJECTIONS)


def _patch_weight_packing() -> None:
    """On CPU vLLM replaces an unquantized linear layer's weight after loading by a packed copy (oneDNN, sgl kernels)
    and drops the plain one: no view of its first k rows exists then. For the projections of the FFNs a neuron plan
    narrows the plugin keeps the plain weight here (``cpu_linear`` is ``F.linear`` until then), so that the
    permutation can act on it; `Narrowed.install` then packs the kept and the dropped neurons' parts separately with
    vLLM's dispatch. Other layers, and other devices, are left as vLLM makes them."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.platforms import current_platform

    original = UnquantizedLinearMethod.process_weights_after_loading
    if getattr(original, "_skipprof", False):
        return

    def process_weights_after_loading(self, layer):
        if current_platform.is_cpu() and keeps_plain_weight(getattr(layer, "prefix", ""),
                                                            neuron_layers(os.environ.get(ENV))):
            layer.cpu_linear = torch.nn.functional.linear
            return None
        return original(self, layer)

    process_weights_after_loading._skipprof = True
    UnquantizedLinearMethod.process_weights_after_loading = process_weights_after_loading


_ACTIVE: ServedPlan | None = None  # the worker process's plan (one model per worker)


@torch.library.custom_op(OP, mutates_args=("out",))
def _ffn_op(x: torch.Tensor, out: torch.Tensor, layer: int) -> None:
    """The planned FFN of `layer` on `x`, written into `out`: like vLLM's attention ops ("..._with_output"), the
    result goes into a buffer the traced graph allocated before the op, so that as a splitting op between piecewise
    CUDA graphs it hands the next graph its input at the address that graph was captured with."""
    out.copy_(_ACTIVE.ffn(layer, x))


@_ffn_op.register_fake
def _(x: torch.Tensor, out: torch.Tensor, layer: int) -> None:
    return None


@torch.library.custom_op(OP + "_rows", mutates_args=())
def _ffn_rows_op(x: torch.Tensor, layer: int) -> torch.Tensor:
    """The planned FFN of `layer` on `x`, rows gathered per the masks: the compiled CPU graph's branch for a forward
    whose rows differ (no CUDA graph to hand a buffer to, so it returns its result)."""
    return _ACTIVE.ffn(layer, x)


@_ffn_rows_op.register_fake
def _(x: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(x)


class ServedPlan:
    """A static plan installed on a vLLM model: per forward the rows each layer skips or narrows, per planned layer
    the op."""

    def __init__(self, runner: Any, plan: PlanFile | SkipPlan, path: str | None = None):
        global _ACTIVE
        model = runner.get_model()
        sites = served_sites(model, path)
        fp = model_fingerprint(model)  # the model vLLM built, fingerprinted as transformers fingerprints it
        if isinstance(plan, PlanFile):
            problems = plan_problems(plan, model.config, fp)
            plan = plan.global_plan
        else:
            from ..plan import neuron_problems, skip_plan_problems

            problems = skip_plan_problems(plan, "plan", len(sites), fp["hidden_size"])
            problems += neuron_problems(plan, intermediate_size(model.config), fp["hidden_size"])
        narrowings = {}
        subsets = plan.neurons if plan.neurons is not None and plan.neurons.widths else None
        if not problems and subsets is not None:  # every check before the first permutation
            for layer in subsets.layers:
                try:
                    narrowings[layer] = Narrowed(sites[layer].ffn, layer, subsets.kept(layer),
                                                 subsets.bias(layer) if subsets.fill != "none" else None,
                                                 subsets.neuron_map(layer) if subsets.fill == "map" else None,
                                                 subsets.regression(layer))
                except PlanError as e:
                    problems += e.problems
        if problems:
            raise PlanError(problem_line(path, problems))
        self.runner, self.plan = runner, plan
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.gather = gathers(self.device)
        self.ffns: dict[int, Any] = {}
        self.fills: dict[int, Any] = {}
        self.narrowings: dict[int, Narrowed] = narrowings
        if plan.compensation != NO_COMPENSATION:
            from ..runtime.compensation import LinearFill, MeanFill

            for layer in plan.skip_layers:
                self.fills[layer] = (MeanFill(plan.ffn_mean[layer]) if plan.compensation == MEAN_OUTPUT else
                                     PackedLinearFill.of(plan.linear, layer, self.device, dtype)
                                     or LinearFill(plan.linear, layer))
        for narrowing in narrowings.values():
            narrowing.install()
        self.calls: dict[int, int] = {}  # per planned layer: calls of its FFN module (full or narrowed rows)
        self.whole: dict[int, int] = {}  # per planned layer: forwards every row of which skipped it (no call)
        for layer in sorted(set(plan.skip_layers) | set(narrowings)):
            mlp = sites[layer].ffn
            self.ffns[layer] = mlp.forward
            self.calls[layer] = self.whole[layer] = 0
            mlp.forward = _planned(layer)
        # a layer's rows follow from its whole-skip fraction (None: never skipped whole) and whether it narrows:
        # layers sharing both share their rows, computed once per forward
        self.fraction = {layer: float(f) for layer, f in plan.skip_layers.items()}
        self.group = {layer: (self.fraction.get(layer), layer in narrowings) for layer in self.ffns}
        self.layers_of: dict[tuple, list[int]] = {}
        for layer, key in self.group.items():
            self.layers_of.setdefault(key, []).append(layer)
        self.layers_in = {key: len(layers) for key, layers in self.layers_of.items()}
        self.in_graph = in_graph(self.gather)
        # compiled on CPU: per group, the host decision as flags the traced graph branches on (torch.cond), so that
        # a forward whose rows all run, skip or narrow a layer stays in the compiled graph; set before each forward
        self.flags = {key: {state: torch.zeros((), dtype=torch.bool) for state in (FULL, SKIP, NARROW)}
                      for key in self.layers_in} if self.in_graph else {}
        hidden = fp["hidden_size"]
        for fill in self.fills.values():  # converted once here: a traced branch must not fill a cache
            fill(torch.zeros(1, hidden, device=self.device, dtype=dtype), hidden)
        self.rows: dict[tuple, tuple] = {}
        self.states: dict[tuple, str] = {}  # this forward's host decision per group (absent: MIXED)
        self._host: tuple[int, dict[tuple, str]] | None = None  # the next forward's, from the runner's host counts
        self._prompt_lens = None if self.gather else torch.zeros_like(
            runner.input_batch.num_prompt_tokens_cpu_tensor, device=self.device)
        self.counts = torch.zeros(4, dtype=torch.int64, device=self.device)  # forwards, prompt, decode, mixed
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.device)  # FFN rows skipped
        self.narrowed = torch.zeros((), dtype=torch.int64, device=self.device)  # FFN rows run on the kept neurons
        # the same counts for host-decided forwards (Python ints: no device work), and per state the planned-layer
        # calls the host decided: "skip" calls read no FFN weight
        self.host_counts = [0, 0, 0, 0, 0, 0]  # forwards, prompt, decode, mixed, skipped rows, narrowed rows
        self.decided = {FULL: 0, SKIP: 0, NARROW: 0, MIXED: 0}
        original_forward = model.forward

        def forward(*args, **kwargs):
            positions = kwargs["positions"] if "positions" in kwargs else args[1]
            self.prepare(positions)
            return original_forward(*args, **kwargs)

        model.forward = forward
        self.host_decisions = _hook_runner(runner, self)
        _ACTIVE = self

    def graph_forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """What vLLM's compiled graph runs for planned `layer` on CPU: branches on this forward's host decision
        (`flags`, set by `prepare`): every row full -- the module's own forward, compiled with the rest of the graph
        as without a plan; every row skipped -- the substitute (no FFN weight read); every row narrowed -- the kept
        neurons; otherwise (rows differ, or a forward the host did not decide) the op, which gathers rows. One
        graph for every state: a branch is chosen per forward, nothing recompiles."""
        key = self.group[layer]
        flags = self.flags[key]

        def mixed(x):
            return torch.ops.skipprof.ffn_rows(x, layer)

        branch = mixed
        if key[1]:
            narrow_mlp = self.narrowings[layer].narrow_mlp
            branch = (lambda x, other=branch: torch.cond(flags[NARROW], narrow_mlp, other, (x,)))
        if key[0] is not None:
            fill = self.fills.get(layer)
            skip = ((lambda x: torch.zeros_like(x)) if fill is None else
                    (lambda x: fill(x, x.shape[-1]).to(x.dtype)))
            branch = (lambda x, other=branch: torch.cond(flags[SKIP], skip, other, (x,)))
        return torch.cond(flags[FULL], self.ffns[layer], branch, (x,))

    def decode_index(self, positions: torch.Tensor) -> torch.Tensor:
        """plan.py's d per token of this forward: positions after the prompt (apply_to all: every position)."""
        if self.plan.apply_to == ALL_POSITIONS:
            return positions
        n, batch = positions.shape[0], self.runner.input_batch
        prompt_lens = batch.num_prompt_tokens_cpu_tensor
        if self._prompt_lens is not None:  # accelerator: vLLM keeps them pinned; copy as it does its own inputs
            prompt_lens = self._prompt_lens.copy_(prompt_lens, non_blocking=True)
        return positions - prompt_lens[self.runner.req_indices.gpu[:n]]

    def schedule(self, d: Any) -> None:
        """Before a forward, on the host: `d` is the decode index of each of its `len(d)` scheduled tokens (numpy, from
        the runner's host counts; padding rows after them are not its tokens). Decides per group of layers whether every
        row runs the whole FFN, skips it or runs it narrowed (else per-row masks), and counts as `prepare` does."""
        import numpy as np

        d = np.asarray(d, dtype=np.int64)
        n = int(d.shape[0])
        skips = fraction_masks(self.plan, d)
        narrows = neuron_masks(self.plan, d, skips)
        states, skipped, narrowed = {}, 0, 0
        for key, n_layers in self.layers_in.items():
            f, narrowing = key
            skip = skips[f] if f is not None else None
            narrow = narrows[f] if narrowing else None
            n_skip = 0 if skip is None else int(skip.sum())
            n_narrow = 0 if narrow is None else int(narrow.sum())
            states[key] = (SKIP if n_skip == n else NARROW if n_narrow == n else FULL if n_skip + n_narrow == 0
                           else MIXED)
            skipped += n_skip * n_layers
            narrowed += n_narrow * n_layers
        prompt = int((d < 0).sum())
        for i, v in enumerate((1, prompt, n - prompt, int(0 < prompt < n), skipped, narrowed)):
            self.host_counts[i] += v
        self._host = (n, states)

    def prepare(self, positions: torch.Tensor) -> None:
        """Once per forward: the host decision `schedule` took for it (none for a forward the runner did not prepare,
        e.g. vLLM's warm-up and capture runs, or one under CUDA-graph capture: all groups MIXED), and per MIXED group
        its skip and narrow masks (and, gathering, their rows) on the device."""
        host, self._host = self._host, None
        if host is not None and (host[0] > positions.shape[0] or _capturing(positions)):
            host = None
        self.rows = {}
        self.states = {} if host is None else host[1]
        for key, layers in self.layers_of.items():
            state = self.states.get(key, MIXED)
            self.decided[state] += len(layers)
            if state != MIXED:  # counted here, as the op or the compiled graph's branch will run it
                for layer in layers:
                    if state == SKIP:
                        self.whole[layer] += 1
                    else:
                        self.calls[layer] += 1
            for flag, value in self.flags.get(key, {}).items():
                value.fill_(flag == state)
        mixed = [key for key in self.layers_in if self.states.get(key, MIXED) == MIXED]
        if not mixed:
            return
        d = self.decode_index(positions)
        skips = fraction_masks(self.plan, d)
        narrows = neuron_masks(self.plan, d, skips)
        for key in mixed:
            f, narrowed = key
            skip = skips[f] if f is not None else None
            narrow = narrows[f] if narrowed else None
            if self.gather:
                full = ~(skip | narrow) if skip is not None and narrow is not None else (
                    ~skip if skip is not None else ~narrow)
                self.rows[key] = (skip, narrow, full.nonzero().flatten(),
                                  None if skip is None else skip.nonzero().flatten(),
                                  None if narrow is None else narrow.nonzero().flatten())
            else:
                self.rows[key] = (skip, narrow, None, None, None)
            if host is None:  # a host-decided forward was counted by `schedule`
                if skip is not None:
                    self.skipped += skip.sum() * self.layers_in[key]
                if narrow is not None:
                    self.narrowed += narrow.sum() * self.layers_in[key]
        if host is None:
            prompt = d < 0
            self.counts += torch.stack([torch.ones_like(self.skipped), prompt.sum(), (~prompt).sum(),
                                        (prompt.any() & (~prompt).any()).long()])

    def ffn(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        key = self.group[layer]
        state = self.states.get(key, MIXED)
        original, fill, narrowing = self.ffns[layer], self.fills.get(layer), self.narrowings.get(layer)
        if state == SKIP:  # every row skips: no FFN weight is read
            return torch.zeros_like(x) if fill is None else fill(x, x.shape[-1]).to(x.dtype)
        if state == NARROW:
            return narrowing.run(x)
        if state == FULL:
            return original(x)
        skip, narrow, full_rows, skip_rows, narrow_rows = self.rows[key]
        if not self.gather:  # fixed shapes: every row computed every way, then selected
            out = self._call(layer, original, x)
            if narrow is not None:
                out = torch.where(narrow[:, None], self._call(layer, narrowing.run, x), out)
            if skip is not None:
                filled = torch.zeros_like(x) if fill is None else fill(x, x.shape[-1]).to(x.dtype)
                out = torch.where(skip[:, None], filled, out)
            return out
        n = x.shape[0]
        if full_rows.numel() == n:
            return self._call(layer, original, x)
        if narrow_rows is not None and narrow_rows.numel() == n:
            return self._call(layer, narrowing.run, x)
        out = x.new_zeros(x.shape) if fill is None else x.new_empty(x.shape)
        if full_rows.numel():
            out.index_copy_(0, full_rows, self._call(layer, original, x.index_select(0, full_rows)))
        if narrow_rows is not None and narrow_rows.numel():
            out.index_copy_(0, narrow_rows, self._call(layer, narrowing.run, x.index_select(0, narrow_rows)))
        if fill is not None and skip_rows is not None and skip_rows.numel():
            rows = x.index_select(0, skip_rows)
            out.index_copy_(0, skip_rows, fill(rows, x.shape[-1]).to(x.dtype))
        return out

    def _call(self, layer: int, forward: Any, x: torch.Tensor) -> torch.Tensor:
        """A per-row-masks call of the FFN module (or its narrowed twin), counted (host-decided ones are counted
        by `prepare`)."""
        self.calls[layer] += 1
        return forward(x)

    def stats(self) -> dict[str, Any]:
        """Counts since start-up. `decided`: planned-layer calls per host decision ("skip": every row skipped, no FFN
        weight read; "mixed": per-row masks, also every call of a forward the host did not decide). Per planned layer:
        `ffn_calls`, calls of its FFN module (full or narrowed rows), and `skipped_whole`, forwards that skipped every
        row without one: a host decision is counted once per forward when it is taken (whether the op or the compiled
        graph's branch then runs it), per-row calls as the op runs them -- not replays of a captured graph."""
        forwards, prompt, decode, mixed = (a + b for a, b in zip(self.counts.tolist(), self.host_counts))
        return {"forwards": forwards, "prompt_tokens": prompt, "decode_tokens": decode, "mixed_forwards": mixed,
                "skipped_ffn_rows": int(self.skipped) + self.host_counts[4],
                "narrowed_ffn_rows": int(self.narrowed) + self.host_counts[5],
                "planned_layers": sorted(self.ffns),
                "widths": {layer: n.k for layer, n in sorted(self.narrowings.items())},
                "path": "gather" if self.gather else "select", "host_decisions": self.host_decisions,
                "decided": dict(self.decided), "ffn_calls": dict(sorted(self.calls.items())),
                "skipped_whole": dict(sorted(self.whole.items()))}


def gathers(device: torch.device) -> bool:
    """Whether the op gathers rows (CPU: row counts are host memory) or selects with masks (accelerators, or any
    device with SKIPPROF_VLLM_PATH=select); one line if the variable has another value."""
    forced = os.environ.get(PATH_ENV)
    if forced in (None, ""):
        return device.type == "cpu"
    if forced not in ("gather", "select"):
        raise PlanError(f"{PATH_ENV}={forced}: expected 'gather' or 'select'")
    if forced == "gather" and device.type != "cpu":
        raise PlanError(f"{PATH_ENV}=gather: gathering needs row counts in host memory; the model is on {device}")
    return forced == "gather"


def in_graph(gather: bool) -> bool:
    """Whether vLLM's compiled graph branches on the host decision (`ServedPlan.graph_forward`): by default where the
    op gathers rows (CPU), whose branch flags are host memory and which no CUDA graph could bake a branch into;
    SKIPPROF_VLLM_IN_GRAPH=0 routes every planned layer through the op instead (as the plugin did before). One line
    if the variable has another value or asks for branches on the accelerators' path."""
    forced = os.environ.get(IN_GRAPH_ENV)
    if forced in (None, ""):
        return gather
    if forced not in ("0", "1"):
        raise PlanError(f"{IN_GRAPH_ENV}={forced}: expected 0 or 1")
    if forced == "1" and not gather:
        raise PlanError(f"{IN_GRAPH_ENV}=1: branching in the compiled graph needs the decision in host memory and no "
                        f"CUDA graphs: the CPU's gathering path ({PATH_ENV}=gather)")
    return forced == "1"


def _capturing(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _hook_runner(runner: Any, served: ServedPlan) -> bool:
    """After the V1 runner prepares a step's inputs on the host, hand `served.schedule` the decode index of every
    scheduled token: num_computed_tokens + place in the step (vLLM's own positions) - prompt length, per the token's
    request. False (every forward per-row masks) for a runner without those buffers, or with speculative decoding,
    whose host counts are optimistic (drafts not yet verified)."""
    needed = ("_prepare_inputs", "req_indices", "query_pos", "input_batch")
    if not all(hasattr(runner, name) for name in needed) or getattr(runner, "speculative_config", None) is not None:
        return False
    if not all(hasattr(runner.input_batch, name) for name in ("num_computed_tokens_cpu", "num_prompt_tokens")):
        return False
    original = runner._prepare_inputs
    all_positions = served.plan.apply_to == ALL_POSITIONS

    def prepare_inputs(scheduler_output, *args, **kwargs):
        out = original(scheduler_output, *args, **kwargs)
        n = scheduler_output.total_num_scheduled_tokens
        batch = runner.input_batch  # read per step: vLLM replaces it when the KV cache groups need other block sizes
        req = runner.req_indices.np[:n]
        d = batch.num_computed_tokens_cpu[req] + runner.query_pos.np[:n]
        served.schedule(d if all_positions else d - batch.num_prompt_tokens[req])
        return out

    runner._prepare_inputs = prepare_inputs
    return True


class Narrowed:
    """One FFN of vLLM's model that a neuron plan narrows: its projections (vLLM linear layers or ``nn.Linear``s with
    a plain [out, in] weight: the inputs -- ``gate_up_proj``'s two halves, or ``up_proj``/``c_fc``/... -- and one
    down projection), the permutation that moves the kept neurons first, and `narrow_mlp`: the module's twin whose
    projections compute on the kept neurons (skipprofiler.runtime.neurons does the same in transformers)."""

    def __init__(self, mlp: Any, layer: int, kept: Any, bias: Any | None, neuron_map: Any | None = None,
                 regression: Any | None = None):
        import numpy as np

        from ..runtime.neurons import FUSED_IN_PROJECTIONS, IN_PROJECTIONS

        self.mlp, self.layer = mlp, layer
        ins, downs, other = [], [], []
        for name, module in mlp.named_children():
            if not any(True for _ in module.parameters()):
                continue
            if name in OUTPUT_PROJECTIONS:
                downs.append(module)
            elif name in IN_PROJECTIONS or name in FUSED_IN_PROJECTIONS:
                ins.append((module, name in FUSED_IN_PROJECTIONS))
            else:
                other.append(name)
        where = f"layer {layer}: {type(mlp).__name__}"
        if len(downs) != 1 or not ins or other:
            what = (f"parameters outside one dense FFN ({', '.join(other[:3])})" if other else
                    f"{len(downs)} down projections" if len(downs) != 1 else "no input projection")
            raise PlanError(f"neurons: {where} has {what}; vLLM serves neuron plans for one dense FFN with a single "
                            "down projection")
        self.ins, self.down = ins, downs[0]
        for module in [m for m, _ in ins] + [self.down]:
            why = self._unsupported(module)
            if why:
                raise PlanError(f"neurons: {where}: {why}")
        self.size = int(self.down.weight.shape[1])
        for module, fused in ins:
            if module.weight.shape[0] != (2 * self.size if fused else self.size):
                raise PlanError(f"neurons: {where}: projection widths disagree ({module.weight.shape[0]} rows vs "
                                f"{self.size} neurons; a tensor-parallel shard?)")
        self.kept = np.asarray(kept, dtype=np.int64)
        self.k = int(self.kept.size)
        if self.k and (self.kept.min() < 0 or self.kept.max() >= self.size):
            raise PlanError(f"neurons: {where} has {self.size} neurons, the plan keeps index {int(self.kept.max())}")
        weight = self.down.weight

        def tensor(array):
            return torch.as_tensor(np.asarray(array, dtype=np.float32)).to(device=weight.device, dtype=weight.dtype)

        self.bias = None if bias is None else tensor(bias)
        # fill map: bias + map_out @ (map_in @ a_K), a_K the kept neurons' activations (runtime/neurons.py's order)
        self.map = None if neuron_map is None else tuple(tensor(m) for m in neuron_map)
        # fill refit: the dropped neurons' activations regressed on the kept ones [I - k, k], folded into the kept
        # down columns at install (`refit`, [hidden, k]), run at narrowed rows in place of the model's own
        self.regression = None if regression is None else np.asarray(regression)
        self.refit: torch.Tensor | None = None

    @staticmethod
    def _unsupported(module: Any) -> str | None:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.numel() == 0:
            return (f"{getattr(module, 'prefix', '') or type(module).__name__} keeps no plain 2-D weight (vLLM packed "
                    "or quantized it): its first k neurons cannot be viewed")
        method = getattr(module, "quant_method", None)
        if method is not None and type(method).__name__ != "UnquantizedLinearMethod":
            return f"{module.prefix} is quantized ({type(method).__name__})"
        if getattr(module, "tp_size", 1) != 1:
            return "tensor parallelism splits the neurons across workers (not served for neuron plans)"
        if getattr(module, "skip_bias_add", False):
            return f"{module.prefix} returns its bias instead of adding it"
        return None

    def order(self) -> torch.Tensor:
        """New position -> old neuron index: the kept neurons first (ascending), then the others."""
        import numpy as np

        dropped = np.setdiff1d(np.arange(self.size, dtype=np.int64), self.kept)
        return torch.from_numpy(np.concatenate([self.kept, dropped]))

    @torch.no_grad()
    def install(self) -> None:
        """Permute the neurons in place (kept first; the dense function is unchanged), patch the projections and
        build `narrow_mlp`, the module's twin whose projections compute on the kept neurons only."""
        from ..runtime.neurons import fold_regression

        order = self.order()

        def move(param: torch.Tensor | None, dim: int, idx: torch.Tensor) -> None:
            if param is not None:
                param.data.copy_(param.data.index_select(dim, idx.to(param.device)))

        narrow = {}
        for module, fused in self.ins:
            idx = torch.cat([order, order + self.size]) if fused else order
            move(module.weight, 0, idx)
            move(getattr(module, "bias", None), 0, idx)
            packed = self._pack(module, fused, out_dim=True)
            if packed:
                module.forward = self._packed_in_forward(module, fused, *packed, narrow=False)
            narrow[module] = (self._packed_in_forward(module, fused, *packed, narrow=True) if packed else
                              self._in_forward(module, fused))
        move(self.down.weight, 1, order)
        if self.regression is not None:
            self.refit = fold_regression(self.down.weight.data, self.k, self.regression)
        packed = self._pack(self.down, False, out_dim=False)
        if packed:
            self.down.forward = self._packed_down_forward(self.down, *packed, narrow=False)
            if self.refit is not None:  # the narrowed rows' down projection: the refitted columns, packed the same way
                from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

                bias = getattr(self.down, "bias", None)
                packed = (cpu_gemm(self.refit, None if bias is None else bias.data, dispatch_cpu_unquantized_gemm),
                          packed[1])
                self.refit = None  # now packed
        narrow[self.down] = (self._packed_down_forward(self.down, *packed, narrow=True) if packed else
                             self._down_forward(self.down))
        self.narrow_mlp = _twin(self.mlp, children={name: _twin(child, forward=narrow[child])
                                                    for name, child in self.mlp.named_children() if child in narrow})

    def _pack(self, module: Any, fused: bool, out_dim: bool) -> tuple | None:
        """On CPU (a vLLM linear layer whose weight `_patch_weight_packing` kept plain): the kept and the dropped
        neurons' parts of the permuted weight, each packed by vLLM's own CPU GEMM dispatch (oneDNN and the like, as
        vLLM packs every other layer), and the plain weight released -- the same memory, and a decode row reads only
        the kept part's packed weight (measured on SmolLM2's shapes: F.linear on weight views ran 1.06-1.9x slower
        than the dense layer's packed GEMM at 1-64 rows; the kept part packed, 0.75-0.84x of it against 0.78 ideal).
        Each part is a module with `weight`, `bias` (the down projection's bias with the kept part only) and vLLM's
        `cpu_linear`, as vLLM leaves a packed layer; (kept, dropped), or None where vLLM computes with F.linear."""
        if getattr(module, "cpu_linear", None) is not F.linear:
            return None
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        k, size = self.k, self.size
        weight, bias = module.weight.data, getattr(module, "bias", None)
        if out_dim:  # input projections: neuron rows (fused gate_up: the first k of each half are kept)
            rows = [(0, k), (size, size + k)] if fused else [(0, k)]
            rest = [(k, size), (size + k, 2 * size)] if fused else [(k, size)]
            parts = [torch.cat([weight[a:b] for a, b in spans]) for spans in (rows, rest)]
            biases = [None if bias is None else torch.cat([bias.data[a:b] for a, b in spans]) for spans in (rows, rest)]
        else:  # the down projection: neuron columns; its bias added once, with the kept part
            parts = [weight[:, :k], weight[:, k:]]
            biases = [None if bias is None else bias.data, None]
        holders = [cpu_gemm(part, part_bias, dispatch_cpu_unquantized_gemm) for part, part_bias in zip(parts, biases)]
        module.weight = torch.nn.Parameter(weight.new_empty(0), requires_grad=False)  # now in the two packed parts
        return tuple(holders)

    def _packed_in_forward(self, module: Any, fused: bool, kept: Any, dropped: Any, narrow: bool):
        k, size = self.k, self.size

        def forward(x):
            out = kept.cpu_linear(x, kept.weight, kept.bias)  # fused: [gate_k, up_k], what SiluAndMul splits
            if not narrow:  # every neuron, in the model's order (kept first, as permuted)
                rest = dropped.cpu_linear(x, dropped.weight, dropped.bias)
                out = (torch.cat([out[..., :k], rest[..., :size - k], out[..., k:], rest[..., size - k:]], -1)
                       if fused else torch.cat([out, rest], -1))
            return (out, None) if getattr(module, "return_bias", False) else out

        return forward

    def _packed_down_forward(self, module: Any, kept: Any, dropped: Any, narrow: bool):
        k = self.k

        def forward(a):
            a_k = a[..., :k].contiguous()
            out = kept.cpu_linear(a_k, kept.weight, kept.bias)
            if not narrow:
                out = out + dropped.cpu_linear(a[..., k:].contiguous(), dropped.weight, dropped.bias)
            elif self.map is not None:
                out = out + F.linear(F.linear(a_k, self.map[0]), self.map[1], self.bias)
            elif self.bias is not None:
                out = out + self.bias
            return (out, None) if getattr(module, "return_bias", False) else out

        return forward

    def _in_forward(self, module: Any, fused: bool):
        k, size = self.k, self.size

        def forward(x):
            weight, bias = module.weight, getattr(module, "bias", None)
            if fused:  # the first k of each half, side by side: what the activation (SiluAndMul) splits in two
                out = torch.cat([F.linear(x, weight[:k], None if bias is None else bias[:k]),
                                 F.linear(x, weight[size:size + k], None if bias is None else bias[size:size + k])],
                                -1)
            else:
                out = F.linear(x, weight[:k], None if bias is None else bias[:k])
            return (out, None) if getattr(module, "return_bias", False) else out

        return forward

    def _down_forward(self, module: Any):
        k = self.k

        def forward(a):
            weight = module.weight[:, :k] if self.refit is None else self.refit
            out = F.linear(a[..., :k], weight, getattr(module, "bias", None))
            if self.map is not None:
                out = out + F.linear(F.linear(a[..., :k], self.map[0]), self.map[1], self.bias)
            elif self.bias is not None:
                out = out + self.bias
            return (out, None) if getattr(module, "return_bias", False) else out

        return forward

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The FFN on rows `x`, its projections on the first k neurons (the module's own forward, on its twin)."""
        return self.narrow_mlp(x)


def cpu_gemm(weight: torch.Tensor, bias: torch.Tensor | None, dispatch: Any) -> Any:
    """A module holding `weight` ([out, in]) and `bias` packed by vLLM's CPU GEMM `dispatch` (oneDNN and the like,
    as vLLM packs its own linear layers): ``h.cpu_linear(x, h.weight, h.bias)`` is ``F.linear(x, weight, bias)``."""
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
    holder.bias = None if bias is None else torch.nn.Parameter(bias.clone(), requires_grad=False)
    dispatch(holder, remove_weight=True)  # converts the bias as its kernel needs
    return holder


class PackedLinearFill:
    """A skipped layer's linear substitute on vLLM's CPU: its matrices packed by vLLM's GEMM dispatch, so the map runs
    the kernel the model's own projections run (the runtime's LinearFill multiplies plain tensors, which measured
    slower than the packed GEMMs around it)."""

    def __init__(self, gemms: list[Any]):
        self.gemms = gemms

    @classmethod
    def of(cls, maps: Any, layer: int, device: torch.device, dtype: torch.dtype) -> PackedLinearFill | None:
        """The packed map of `layer`; None where vLLM does not pack (not its CPU platform, or vLLM not installed)."""
        if device.type != "cpu":
            return None
        try:
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
            from vllm.platforms import current_platform
        except ImportError:
            return None
        if not current_platform.is_cpu():
            return None
        t = {k: torch.from_numpy(v).to(dtype) for k, v in maps.layer_tensors(layer).items()}
        if "weight" in t:  # x @ W + b: F.linear's weight is W transposed
            return cls([cpu_gemm(t["weight"].t(), t["bias"], dispatch_cpu_unquantized_gemm)])
        return cls([cpu_gemm(t["down"].t(), None, dispatch_cpu_unquantized_gemm),
                    cpu_gemm(t["up"].t(), t["bias"], dispatch_cpu_unquantized_gemm)])

    def __call__(self, x: torch.Tensor, hidden: int, stream: torch.Tensor | None = None) -> torch.Tensor:
        for gemm in self.gemms:
            x = gemm.cpu_linear(x, gemm.weight, gemm.bias)
        return x


def _twin(module: Any, forward: Any = None, children: dict[str, Any] | None = None) -> Any:
    """A shallow copy of `module` that shares its parameters, buffers and hooks (the very same dicts: a hook
    registered on `module` later fires on the twin too) and computes with `forward` (default: its class's), with
    `children` in place of its submodules of those names. Not registered anywhere: the model's state dict and
    parameters are unchanged."""
    import copy

    twin = copy.copy(module)
    twin.__dict__.pop("forward", None)
    if forward is not None:
        twin.forward = forward
    if children:
        twin._modules = dict(module._modules)
        twin._modules.update(children)
    return twin


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


def neuron_masks(plan: SkipPlan, d: torch.Tensor,
                 skips: dict[float, torch.Tensor] | None = None) -> dict[float | None, torch.Tensor]:
    """Which tokens of a forward run only the kept neurons (decode indices `d`, on the device), per whole-skip
    fraction of the plan's neuron layers (None: layers `skip_layers` does not list): eligible and not skipped whole
    there -- `SkipPlan.narrowed_layers_at`, per token, without a host sync. `skips`: `fraction_masks(plan, d)` if
    already computed. Empty for a plan without neuron subsets."""
    if plan.neurons is None or not plan.neurons.widths:
        return {}
    eligible = plan.eligible(d)
    skips = fraction_masks(plan, d) if skips is None else skips
    keys = {None if plan.skip_layers.get(l) is None else float(plan.skip_layers[l]) for l in plan.neurons.layers}
    return {f: eligible if f is None else eligible & ~skips[f] for f in keys}


def _planned(layer: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and _ACTIVE.in_graph:  # traced on CPU: branches on the host decision
            return _ACTIVE.graph_forward(layer, x)
        if torch.compiler.is_compiling():  # traced (vLLM's torch.compile): the opaque op, run at every forward
            out = torch.empty_like(x)
            torch.ops.skipprof.ffn(x, out, layer)
            return out
        return _ACTIVE.ffn(layer, x)  # eager (enforce_eager): the op's body without the op

    return forward
