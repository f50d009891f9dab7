"""Plan format v1: the data model of a YAML skip plan (see docs/plan-format.md).

Imports only the standard library (plan/io.py reads and writes the YAML): the runtime loads plans in deployment code.

Semantics shared by the runtime, the fitter's simulation and eval (they must agree exactly):

* Decode index d: 0 for the first position processed after the prompt (the first generated token fed back), 1 for
  the next, ... Prompt positions have no decode index and stay dense when ``apply_to == "decode"``.
  With ``apply_to == "all"`` every position is eligible and d counts from the first position of the sequence.
* A position is *eligible* for skipping iff ``d >= warmup_tokens`` and not ``(dense_every > 0 and
  (d + 1) % dense_every == 0)``.
* static: an eligible position skips the FFN of every layer in ``skip_layers``; a layer with ``fraction f < 1`` is
  skipped only at decode indices where ``floor((d + 1) * f) > floor(d * f)`` (an even, deterministic pattern),
  evaluated in float64. `SkipPlan.eligible`, `fraction_pattern` and `SkipPlan.skippable_layers` below are the only
  implementations: the runtime, the fit's simulation, refine, validation and the vLLM plugin all call them.
* adaptive (FFN-SkipLLM): per eligible position, walk the layers in order. Layers ``l < cold_start`` and
  ``l >= L - cold_end`` always run. After a layer l that ran densely with ``l >= cold_start - 1`` and no run taken yet,
  if ``cos_l > tau[l]`` (cos_l = cos(h, h + FFN contribution), the profiled ``residual`` metric) and
  ``l + 1 < L - cold_end``, the next ``max_skip`` FFNs (cut at ``L - cold_end``) are skipped. One run per position.
* skip ratio = skipped FFN calls / (eligible-or-not decode positions after warm-up x num_layers).
* compensation ``norm_ratio``: a skipped FFN's contribution is replaced by ``(norm_gain[l] - 1) * h`` where h is the
  stream entering the FFN sub-block and norm_gain[l] the calibrated mean of ||h + contribution|| / ||h||.
* compensation ``mean_output``: a skipped FFN's output is replaced by ``ffn_mean[l]``, the mean of that FFN's output
  over calibration decode positions (a constant vector: no FFN work, one add).
* compensation ``linear``: a skipped FFN's output is replaced by ``x @ W_l + b_l`` (rank r: ``(x @ D_l) @ U_l + b_l``),
  x being what the FFN reads; the maps live in a safetensors file beside the plan (``linear``: file, sha256, rank).
* neurons (static plans; ``neurons``: fill, widths, file, sha256): at an eligible decode position, layer l's FFN
  computes only its ``kept[l]`` intermediate neurons (rows of the gate/up or fc1 projection, columns of the down
  projection); the others are not computed. With ``fill: mean`` the dropped neurons' mean output over calibration
  decode positions, ``bias[l] = W_down[:, dropped] E[a_dropped]``, is added instead; with ``fill: refit`` the
  plan stores ``regression[l]``, the least-squares prediction of the dropped neurons' activations from the kept ones
  (a_dropped ~ regression @ a_kept + const), and the runtime folds it into the kept down columns once,
  ``W_down[:, kept] + W_down[:, dropped] @ regression[l]`` (no FLOPs beyond the bias; one [hidden, k] matrix per
  layer in memory beside the model's own columns, which still serve full rows). A layer that ``skip_layers`` skips
  at that position is skipped whole (width 0). Prompt positions (``apply_to: decode``) and ineligible positions run
  every neuron. The index arrays and biases live in the plan's safetensors file, like linear maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PLAN_VERSION = 1
MODES = ("static", "adaptive")
BATCH_DECISIONS = ("per_sequence", "shared")  # adaptive: rows of a batch decide alone, or fire together
APPLY_TO = ("decode", "all")
COMPENSATIONS = ("none", "norm_ratio", "mean_output", "linear")
NEURON_FILLS = ("none", "mean", "map", "refit")  # what replaces the output of an FFN's dropped neurons
NEURON_TENSOR_PARTS = {"none": ("kept",), "mean": ("kept", "bias"), "map": ("kept", "bias", "map_in", "map_out"),
                       "refit": ("kept", "bias", "regression")}
ROUTER_POOLINGS = ("mean", "mean_after_first")  # how the router pools a prompt's hidden states (Router.pooling)
STATIC, ADAPTIVE = MODES
PER_SEQUENCE, SHARED = BATCH_DECISIONS
DECODE, ALL_POSITIONS = APPLY_TO
NO_COMPENSATION, NORM_RATIO, MEAN_OUTPUT, LINEAR = COMPENSATIONS
# Keys a plan may override from `defaults`.
DEFAULT_KEYS = ("apply_to", "warmup_tokens", "dense_every", "compensation")

# A plan whose warm-up covers at least this share of the evaluated generation length is flagged: its rows describe
# the few positions after the warm-up, and a deployment generating that many tokens saves little.
WARMUP_WARN_SHARE = 0.5


def generation_warnings(plan: SkipPlan, gen_len: int, saved_share: float | None = None) -> list[str]:
    """Why a row may look better than the plan will be: the warm-up covers most of the generation, nothing was
    skipped, or the plan was fitted for another generation length."""
    warnings = []
    if plan.warmup_tokens >= WARMUP_WARN_SHARE * gen_len:
        covered = min(plan.warmup_tokens, gen_len)
        warnings.append(f"warm-up of {plan.warmup_tokens} tokens covers {covered} of the {gen_len} generated "
                        "positions evaluated")
    fitted_for = plan.fit.get("gen_len") if plan.fit else None
    if fitted_for and fitted_for != gen_len:
        warnings.append(f"fitted for {fitted_for} generated tokens, evaluated at {gen_len}")
    if saved_share is not None and saved_share == 0 and not plan.is_empty():
        warnings.append("skipped nothing: this row is the dense model, not a lossless plan")
    return warnings


class PlanError(ValueError):
    """A plan is invalid; `problems` lists every problem found (validation reports all at once)."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


@dataclass
class LinearMaps:
    """The maps of `compensation: linear`, one per layer the plan may skip. `tensors` (numpy float32, keys
    ``"<layer>.bias"`` plus ``"<layer>.weight"`` [d, d] or ``"<layer>.down"`` [d, r] and ``"<layer>.up"`` [r, d]) are
    stored in `file` (relative to the plan file), whose sha256 the plan records."""

    rank: int | None  # None: full d x d maps
    tensors: dict[str, Any]
    file: str | None = None
    sha256: str | None = None

    @property
    def layers(self) -> list[int]:
        return sorted({int(k.split(".")[0]) for k in self.tensors})

    def layer_tensors(self, layer: int) -> dict[str, Any]:
        """{"bias", "weight"} or {"bias", "down", "up"} of one layer."""
        prefix = f"{layer}."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def keep(self, layers: set[int]) -> LinearMaps:
        return LinearMaps(self.rank, {k: v for k, v in self.tensors.items() if int(k.split(".")[0]) in layers},
                          self.file, self.sha256)

    def flops_per_call(self, hidden: int) -> float:
        """Multiply-add FLOPs of one map application to one position: 2·d² + d, rank r: 4·d·r + d."""
        return float(2 * hidden * hidden + hidden if self.rank is None else 4 * hidden * self.rank + hidden)


@dataclass
class NeuronSubsets:
    """The FFN neurons a static plan keeps at decode positions, per layer. `tensors` (numpy, keys
    ``"<layer>.kept"``: int64 [k] indices of the kept intermediate neurons, ascending; with ``fill == "mean"`` also
    ``"<layer>.bias"``: float32 [hidden], the dropped neurons' mean output; with ``fill == "map"`` the bias and a
    rank-r map from the kept neurons' activations a_K onto the dropped neurons' output,
    ``bias + map_out @ (map_in @ a_K)``: ``"<layer>.map_in"`` float32 [r, k], ``"<layer>.map_out"`` float32
    [hidden, r]; with ``fill == "refit"`` the bias and ``"<layer>.regression"`` float16 or float32 [I - k, k]: the
    dropped neurons' activations (rows, ascending neuron index) predicted from the kept ones' (columns), which the
    runtime folds into the kept down columns as W_down[:, kept] + W_down[:, dropped] @ it) are stored in `file`
    (relative to the plan file), whose sha256 the plan records. Layers without an entry run every neuron.

    `intermediate_size` is the FFN width the subsets were chosen for (the plan file records it; the runtime checks it
    against the model). `recorded_widths` are the widths the plan file states (read before the tensors are: the file's
    arrays must match them); subsets built in code leave it None and take their widths from the tensors."""

    fill: str  # NEURON_FILLS
    tensors: dict[str, Any]
    file: str | None = None
    sha256: str | None = None
    intermediate_size: int | None = None
    recorded_widths: dict[int, int] | None = None
    rank: int | None = None  # fill map: the maps' rank r

    @property
    def layers(self) -> list[int]:
        return sorted(self.widths)

    def kept(self, layer: int) -> Any:
        return self.tensors[f"{layer}.kept"]

    def bias(self, layer: int) -> Any | None:
        return self.tensors.get(f"{layer}.bias")

    def neuron_map(self, layer: int) -> tuple[Any, Any] | None:
        """(map_in [r, k], map_out [hidden, r]) of fill map; None without one."""
        if f"{layer}.map_in" not in self.tensors:
            return None
        return self.tensors[f"{layer}.map_in"], self.tensors[f"{layer}.map_out"]

    def regression(self, layer: int) -> Any | None:
        """Fill refit's regression [I - k, k] of the dropped neurons' activations on the kept ones; None without."""
        return self.tensors.get(f"{layer}.regression")

    @property
    def widths(self) -> dict[int, int]:
        """layer -> kept width k: from the index arrays once read, else as the plan file records them."""
        if self.tensors:
            return {l: len(self.tensors[f"{l}.kept"]) for l in
                    sorted({int(k.split(".")[0]) for k in self.tensors if k.endswith(".kept")})}
        return dict(sorted((self.recorded_widths or {}).items()))


@dataclass
class SkipPlan:
    """One plan (the global one or a class's): which FFNs to skip on which positions."""

    mode: str
    apply_to: str = "decode"
    warmup_tokens: int = 0
    dense_every: int = 0  # 0: never force a dense token
    compensation: str = "none"
    # static
    skip_layers: dict[int, float] = field(default_factory=dict)  # layer -> fraction of eligible positions (1.0 = all)
    # adaptive
    tau: list[float] | None = None  # one threshold per layer (index = the trigger layer)
    cold_start: int = 0
    cold_end: int = 0
    max_skip: int = 0
    batch_decision: str = "per_sequence"  # the runtime's default for this plan (apply_plan(batch_decision=...))
    # calibration facts
    norm_gain: list[float] | None = None  # per layer; needed by compensation norm_ratio
    ffn_mean: dict[int, list[float]] | None = None  # layer -> mean FFN output (hidden_size); compensation mean_output
    linear: LinearMaps | None = None  # compensation linear: the fitted maps
    neurons: NeuronSubsets | None = None  # static: part of an FFN kept at decode positions (layers not skipped whole)
    expected_skip_ratio: float | None = None
    fit: dict[str, Any] = field(default_factory=dict)  # how it was fitted (statistic, target, measured KL, ...)

    def is_empty(self) -> bool:
        if self.mode == STATIC:
            return not self.skip_layers and not (self.neurons is not None and self.neurons.widths)
        return self.max_skip == 0

    def eligible(self, d: Any) -> Any:
        """Whether decode index d may skip (the module docstring's rule). Vectorised: d is an int, a numpy array or a
        torch tensor (any device) and the answer has its shape; every caller -- runtime, fit, vLLM -- uses this."""
        return is_eligible(d, self.warmup_tokens, self.dense_every)

    def static_layers_at(self, d: int) -> list[int]:
        """Layers a static plan skips at decode index d (empty when the position is not eligible)."""
        if not self.eligible(d):
            return []
        return [l for l, f in sorted(self.skip_layers.items()) if fraction_pattern(f, d)]

    def narrowed_layers_at(self, d: int) -> list[int]:
        """Layers whose FFN runs only its kept neurons at decode index d: the plan's neuron layers at an eligible
        position, less those `static_layers_at(d)` skips whole."""
        if self.neurons is None or not self.eligible(d):
            return []
        whole = set(self.static_layers_at(d))
        return [l for l in self.neurons.layers if l not in whole]

    def skippable_layers(self, num_layers: int | None = None) -> list[int]:
        """The layers this plan may ever skip: a static plan's `skip_layers`; an adaptive plan's layers between its
        cold ends (`num_layers` defaults to the length of `tau`)."""
        if self.mode == STATIC:
            return sorted(int(l) for l in self.skip_layers)
        if num_layers is None:
            num_layers = len(self.tau) if self.tau else 0
        return list(range(self.cold_start, num_layers - self.cold_end))


def is_eligible(d: Any, warmup_tokens: int, dense_every: int) -> Any:
    """Whether decode index d may skip: ``d >= warmup_tokens`` and not a ``dense_every`` position (vectorised)."""
    ok = d >= warmup_tokens
    if dense_every > 0:
        ok = ok & ((d + 1) % dense_every != 0)
    return ok


def fraction_pattern(fraction: float, d: Any) -> Any:
    """Whether a layer with this fraction skips at (eligible) decode index d: ``floor((d + 1) f) > floor(d f)``,
    evaluated in float64 for ints, numpy arrays and torch tensors alike (a torch int tensor times a Python float
    would be float32 and drift from the pattern past d ~ 90)."""
    if fraction >= 1.0:
        return d == d  # True, shaped like d
    x = _float64(d)
    return (x + 1) * fraction // 1 > x * fraction // 1


def _float64(d: Any) -> Any:
    if isinstance(d, (int, float)):
        return float(d)
    if hasattr(d, "double"):  # torch.Tensor
        return d.double()
    return d.astype("float64")  # numpy


@dataclass
class Router:
    """Nearest-centroid prompt router: mean hidden state (output of `layer`) over the prompt's tokens."""

    layer: int
    classes: list[str]
    centroids: list[list[float]]
    metric: str = "cosine"
    heldout_accuracy: float | None = None
    # "mean": every prompt token; "mean_after_first": all but the sequence's first token, whose hidden state in real
    # LLMs is an attention sink with ~100x the norm of the others and would dominate a short prompt's mean.
    pooling: str = "mean"


@dataclass
class PlanFile:
    """A whole plan file: one model, a global plan, optional class plans and router."""

    model: dict[str, Any]  # {"name": str, "fingerprint": {...}}
    global_plan: SkipPlan
    classes: dict[str, SkipPlan] = field(default_factory=dict)
    router: Router | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def named_plans(self) -> list[tuple[str, SkipPlan]]:
        """("global", plan) then ("class.<name>", plan) by name: how problems and the maps' file name each plan."""
        return [("global", self.global_plan)] + [(f"class.{n}", p) for n, p in sorted(self.classes.items())]

    def select(self, prompt_class: str | None) -> SkipPlan:
        if prompt_class is None:
            return self.global_plan
        if prompt_class not in self.classes:
            known = ", ".join(sorted(self.classes)) or "none (this plan has only a global plan)"
            raise PlanError(f"unknown prompt class {prompt_class!r}; the plan's classes: {known}")
        return self.classes[prompt_class]
