"""Decode benchmarks: dense vs plans, interleaved, warm-up excluded, median of >= 5, against the FLOP ideal.

Used by ``benchmarks/decode_speed.py`` and ``skipprof bench decode``. Every arm runs the same greedy decode loop
(``greedy.greedy_decode``: KV cache, ``logits_to_keep=1``); the arms of one repeat run back to back in rotating order
so that drift in machine load hits all arms alike.

The FLOP ideal counts multiply-adds (x2) of every matmul a decoder token costs: attention projections, attention over
the cache, the FFN and the LM head; ideal speedup = dense FLOPs / (dense FLOPs - FFN FLOPs saved net of substitutes)
over the same run (prompt included), the FFN FLOPs saved as the runtime counts them (``handle.stats()``'s
``ffn_flops_saved_share``: skipped FFN calls, the dropped neurons of narrowed rows, less the FLOPs of linear maps and
mean biases computed in their place).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._jsonable import rounded
from ..arch.flops import FlopModel
from ..arch.greedy import greedy_decode
from ..plan.model import PlanFile, SkipPlan
from ..arch.registry import resolve
from ..runtime import apply_plan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# ~100 M parameters: 12 x 7.1 M (attention 2.4 M + gated FFN 4.7 M) + 2 x 24.6 M embeddings / LM head.
SYNTHETIC_CONFIGS: dict[str, dict[str, int]] = {
    "llama-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=32000),
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=512),
}


@dataclass
class Arm:
    """One contender: a plan (None = dense, no runtime at all) and, for plan files, the prompt class."""

    name: str
    plan: PlanFile | SkipPlan | None
    prompt_class: str | None = None
    batch_decision: str | None = None  # apply_plan(batch_decision=...) for adaptive plans (None: the plan's own)


@dataclass
class ArmResult:
    name: str
    seconds: list[float] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    dense_flops: float = 0.0
    plan_flops: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def ideal_speedup(self) -> float:
        return self.dense_flops / self.plan_flops if self.plan_flops else 1.0


def _narrowed_ratio(stats: dict[str, Any]) -> float:
    """FFN rows that ran only their kept neurons / (decode positions x layers) of one run (0 without a plan)."""
    calls = stats.get("decode_positions", 0) * stats.get("num_layers", 0)
    return stats.get("narrowed_rows", 0) / calls if calls else 0.0


@dataclass
class DecodeBenchmark:
    """Results of one (model, batch, dtype) setting."""

    label: str
    batch: int
    dtype: str
    new_tokens: int
    prompt_tokens: int
    results: list[ArmResult]

    def dense(self) -> ArmResult:
        return self.results[0]

    def rows(self) -> list[dict[str, Any]]:
        dense = self.dense()
        out = []
        for r in self.results:
            speedup = dense.median / r.median
            # Per-round ratios (arms are interleaved, so round i of each arm ran side by side): their spread is the
            # timing noise of this run.
            paired = sorted(d / p for d, p in zip(dense.seconds, r.seconds))
            out.append({
                "arm": r.name, "batch": self.batch, "dtype": self.dtype,
                "tok_per_s": self.batch * self.new_tokens / r.median, "median_s": r.median,
                "saved_ratio": r.stats.get("not_computed_ratio", 0.0), "decided_skip_ratio": r.stats.get("decided_skip_ratio", 0.0),
                "narrowed_ratio": _narrowed_ratio(r.stats),
                "ffn_flops_saved_share": r.stats.get("ffn_flops_saved_share", 0.0),
                "speedup": speedup,
                "ideal_speedup": r.ideal_speedup, "measured_over_ideal": speedup / r.ideal_speedup,
                "runs": len(r.seconds), "speedup_min": paired[0], "speedup_max": paired[-1],
            })
        return out

    def table(self) -> str:
        head = (f"{self.label}  bs={self.batch}  {self.dtype}  prompt={self.prompt_tokens}  new={self.new_tokens}  "
                f"median of {len(self.dense().seconds)} interleaved runs (warm-up excluded)")
        lines = [head, (f"{'arm':<24}{'saved':>7}{'FFN FLOPs saved':>16}{'tok/s':>9}{'speedup':>9}{'ideal':>8}"
                        f"{'meas/ideal':>12}")]
        for row in self.rows():
            lines.append(f"{row['arm']:<24}{row['saved_ratio']:>7.1%}{row['ffn_flops_saved_share']:>16.1%}"
                         f"{row['tok_per_s']:>9.1f}{row['speedup']:>8.3f}x"
                         f"{row['ideal_speedup']:>7.3f}x{row['measured_over_ideal']:>12.3f}")
        return "\n".join(lines)


def synthetic_model(name: str = "llama-100m", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A random-weight Llama of a known size (for speed only: its outputs are meaningless)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in SYNTHETIC_CONFIGS:
        raise ValueError(f"unknown synthetic model {name!r}; known: {', '.join(SYNTHETIC_CONFIGS)}")
    torch.manual_seed(seed)
    config = LlamaConfig(**SYNTHETIC_CONFIGS[name], max_position_embeddings=4096, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    return model.to(dtype)


# ---- FLOPs ----------------------------------------------------------------------------------------------------------


def run_flops(model: nn.Module, batch: int, prompt_tokens: int, new_tokens: int, skipped_calls: int = 0,
              substitute_flops: float = 0.0, *, ffn_flops_saved: float | None = None) -> tuple[float, float]:
    """(dense FLOPs, plan FLOPs) of one benchmark run: prompt forward (logits for the last position only) + decode.
    The plan's FFN FLOPs saved net of substitutes are taken off: `ffn_flops_saved` when given (every plan kind, e.g.
    `FlopModel.ffn_flops_saved(handle.stats())`: whole skips, narrowed rows, less linear maps and mean biases), else
    the skipped FFN calls less what linear substitutes computed instead."""
    flops = FlopModel.of(model)
    f = flops.flops
    per_layer = f["ffn"] + f["attn_proj"]
    attention_prompt = f["attn_per_position"] * prompt_tokens * (prompt_tokens + 1) / 2
    dense = batch * (prompt_tokens * per_layer * f["layers"] + attention_prompt * f["layers"] + f["lm_head"])
    for t in range(new_tokens - 1):  # the last token is sampled from the previous forward's logits
        dense += batch * flops.per_token(f["layers"], context=prompt_tokens + t + 1)
    if ffn_flops_saved is None:
        ffn_flops_saved = skipped_calls * f["ffn"] - substitute_flops
    return dense, dense - ffn_flops_saved


# ---- the timed loop -------------------------------------------------------------------------------------------------


def benchmark_prompt(model: nn.Module, batch: int, prompt_tokens: int, seed: int = 0) -> torch.Tensor:
    """The seeded random prompt every arm decodes from (and adaptive benchmark plans are calibrated on)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, prompt_tokens), generator=g).to(next(model.parameters()).device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_decode(model: nn.Module, arms: list[Arm], batch: int = 1, prompt_tokens: int = 16,
                     new_tokens: int = 128, repeats: int = 5, warmup: int = 1, seed: int = 0,
                     label: str = "model", dtype_name: str = "fp32", log=None) -> DecodeBenchmark:
    """Time every arm `warmup + repeats` times, interleaved (rotating order); the first `warmup` rounds are dropped."""
    if repeats < 5:
        raise ValueError("repeats must be >= 5 (medians of fewer runs are not reported)")
    if arms[0].plan is not None:
        arms = [Arm("dense", None)] + arms
    device = next(model.parameters()).device
    prompt = benchmark_prompt(model, batch, prompt_tokens, seed)
    results = [ArmResult(a.name) for a in arms]
    for rnd in range(warmup + repeats):
        order = list(range(len(arms)))
        shift = rnd % len(arms)
        order = order[shift:] + order[:shift]
        for i in order:
            arm, result = arms[i], results[i]
            handle = (apply_plan(model, arm.plan, prompt_class=arm.prompt_class, batch_decision=arm.batch_decision)
                      if arm.plan is not None else None)
            try:
                _sync(device)
                start = time.perf_counter()
                greedy_decode(model, prompt, new_tokens)
                _sync(device)
                elapsed = time.perf_counter() - start
                stats = handle.stats() if handle is not None else {}
            finally:
                if handle is not None:
                    handle.remove()
            if rnd >= warmup:
                result.seconds.append(elapsed)
                result.stats = stats
        if log is not None:
            log(f"  round {rnd + 1}/{warmup + repeats}" + (" (warm-up)" if rnd < warmup else ""))
    flops = FlopModel.of(model)
    for r in results:
        saved = flops.ffn_flops_saved(r.stats) if r.stats else 0.0
        r.dense_flops, r.plan_flops = run_flops(model, batch, prompt_tokens, new_tokens, ffn_flops_saved=saved)
    return DecodeBenchmark(label, batch, dtype_name, new_tokens, prompt_tokens, results)


# ---- plans for synthetic benchmarks ---------------------------------------------------------------------------------


def middle_static_plan(num_layers: int, skip_ratio: float) -> SkipPlan:
    """A static plan skipping `skip_ratio` of the FFNs, centred in the upper middle (last full layer fractional)."""
    total = skip_ratio * num_layers
    full = int(math.floor(total + 1e-9))
    start = max(1, (num_layers - math.ceil(total)) // 2)
    layers: dict[int, float] = {start + i: 1.0 for i in range(full)}
    if total - full > 1e-6:
        layers[start + full] = rounded(total - full, 6, decimals=True)
    return SkipPlan(mode="static", skip_layers=layers, expected_skip_ratio=skip_ratio)


def decode_residual_cos(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """[tokens, L] cos(h, h + FFN contribution) on dense greedy decode (the prompt forward is left out)."""
    from ..arch.capture import FFNCapture  # every residual form (post-norm, residual-inside, parallel) in one place

    rows: list[list[torch.Tensor]] = []

    def on_layer(t) -> None:
        if t.index == 0:
            rows.append([])
        stream = t.stream_out.float().reshape(-1, t.stream_out.shape[-1])
        h = t.stream_in_ffn.float().reshape(stream.shape)
        rows[-1].append(torch.nn.functional.cosine_similarity(h, stream, dim=-1))

    with FFNCapture(model, on_layer):
        greedy_decode(model, prompt, new_tokens)
    return torch.cat([torch.stack(r, 1) for r in rows[1:]], 0)  # [tokens * batch, L]


def measured_skip_ratio(model: nn.Module, plan: SkipPlan, prompt: torch.Tensor, new_tokens: int,
                        batch_decision: str = "per_sequence") -> float:
    with apply_plan(model, plan, batch_decision=batch_decision) as handle:
        greedy_decode(model, prompt, new_tokens)
        return handle.stats()["decided_skip_ratio"]


def calibrate_adaptive(model: nn.Module, target: float, prompt: torch.Tensor, new_tokens: int, cold_start: int = 2,
                       cold_end: int = 2, max_skip: int | None = None, steps: int = 8,
                       cos: torch.Tensor | None = None, batch_decision: str = "per_sequence") -> SkipPlan:
    """An FFN-SkipLLM plan whose per-layer thresholds are one shared quantile of the dense decode cos, bisected on
    the skip ratio the runtime really reaches on `prompt` over `new_tokens` (benchmark plans: speed only, not
    quality). Calibrate on the run that is timed: the rule's skip ratio depends on the prompt and the decode length
    (random-weight models drift into repetition), so a plan calibrated on another run lands far from its target.

    A token that triggers skips a whole run of k FFNs, so the reachable ratios are multiples of k / L times the
    share of tokens that trigger; when decoded tokens look alike that share jumps from 0 to most tokens at once.
    Without `max_skip`, k is the run length that needs ~75 % of tokens to trigger, or the next one when that misses
    the target by more than 0.01; the closest measured plan wins (`cos`: the dense decode cos, reusable).
    The ratio is measured with `batch_decision` (rows deciding together fire less often than alone).
    """
    cos = (cos if cos is not None else decode_residual_cos(model, prompt, new_tokens)).cpu()
    L = cos.shape[1]
    longest = max(1, L - cold_start - cold_end - 1)
    if max_skip is not None:
        lengths = [max_skip]
    else:
        first = min(longest, max(1, math.ceil(target * L / 0.75)))
        lengths = [k for k in (first, first + 1) if k <= longest]
    best: tuple[float, SkipPlan] | None = None
    for k in lengths:
        lo, hi = 0.0, 1.0
        for _ in range(steps):
            q = (lo + hi) / 2
            tau = [float(torch.quantile(cos[:, l], q)) for l in range(L)]
            plan = SkipPlan(mode="adaptive", tau=tau, cold_start=cold_start, cold_end=cold_end, max_skip=k,
                            expected_skip_ratio=target)
            ratio = measured_skip_ratio(model, plan, prompt, new_tokens, batch_decision)
            if best is None or abs(ratio - target) < abs(best[0] - target):
                best = (ratio, plan)
            if abs(ratio - target) < 0.01:
                break
            lo, hi = (q, hi) if ratio > target else (lo, q)  # a higher quantile triggers less often
        if abs(best[0] - target) < 0.01:
            break
    ratio, plan = best
    plan.fit = {"statistic": "shared quantile of dense decode cos", "target": target, "calibration_skip_ratio": ratio}
    return plan


# ---- a whole suite (CLI and benchmarks/decode_speed.py) -------------------------------------------------------------


def load_suite_model(spec: str, dtype: torch.dtype, device: str = "cpu") -> tuple[nn.Module, str]:
    """(model, label): `synthetic:<name>` (random weights, see SYNTHETIC_CONFIGS), else what `models.load_model`
    loads (a Hugging Face checkpoint folder, a .gguf file or a hub id), on `device`."""
    if spec.startswith("synthetic:"):
        name = spec.split(":", 1)[1]
        return synthetic_model(name, dtype).to(device), f"{name} (random weights)"
    from ..arch.models import load_model, model_source

    source = model_source(spec)
    return load_model(source, dtype=dtype, device=device), source.display


def default_arms(model: nn.Module, static_ratio: float | None, adaptive_targets: list[float],
                 include_empty: bool = True, batch: int = 1, prompt_tokens: int = 16, new_tokens: int = 128,
                 seed: int = 0, batch_decisions: tuple[str, ...] = ("per_sequence",)) -> list[Arm]:
    """Dense, the empty plan, a static plan at `static_ratio`, adaptive plans calibrated to each target on the
    benchmark's own prompt and decode length, once per batch decision (one row decides alone: bs 1 runs only the
    first)."""
    L = resolve(model).num_layers
    prompt = benchmark_prompt(model, batch, prompt_tokens, seed)
    arms = [Arm("dense", None)]
    if include_empty:
        arms.append(Arm("empty plan", SkipPlan(mode="static")))
    if static_ratio:
        arms.append(Arm(f"static {static_ratio:.0%}", middle_static_plan(L, static_ratio)))
    cos = decode_residual_cos(model, prompt, new_tokens) if adaptive_targets else None
    decisions = batch_decisions if batch > 1 else batch_decisions[:1]
    for decision in decisions:
        suffix = "" if decision == "per_sequence" else f" {decision}"
        for target in adaptive_targets:
            plan = calibrate_adaptive(model, target, prompt, new_tokens, cos=cos, batch_decision=decision)
            arms.append(Arm(f"adaptive {target:.0%}{suffix}", plan, batch_decision=decision))
    return arms


def run_suite(model_spec: str, batches: list[int], dtypes: list[str], static_ratio: float | None,
              adaptive_targets: list[float], plan_arms: list[Arm] | None = None, new_tokens: int = 128,
              prompt_tokens: int = 16, repeats: int = 5, include_defaults: bool = True,
              batch_decisions: tuple[str, ...] = ("per_sequence",), log=print,
              device: str = "cpu") -> list[DecodeBenchmark]:
    """Every (dtype, batch) setting: build the model, its arms, time them interleaved, log the table."""
    suites = []
    for dtype_name in dtypes:
        model, label = load_suite_model(model_spec, DTYPES[dtype_name], device)
        label += f" on {device}" if device != "cpu" else ""
        for batch in batches:
            arms = default_arms(model, static_ratio, adaptive_targets, include_empty=include_defaults, batch=batch,
                                prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch_decisions=batch_decisions)
            arms += [a for a in plan_arms or [] if batch > 1 or a.batch_decision in (None, batch_decisions[0])]
            log(f"[{label} {dtype_name} bs={batch}] {len(arms)} arms x (1 warm-up + {repeats}) runs")
            result = benchmark_decode(model, arms, batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                                      repeats=repeats, label=label, dtype_name=dtype_name, log=log)
            log(result.table())
            suites.append(result)
    return suites
