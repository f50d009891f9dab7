"""Per decode step, a static plan adds no host syncs, no host-to-device copies and no bookkeeping ops: the only tensor
ops the runtime issues are the fills of skipped FFNs. Every aten op of a decode step is recorded with the code that
issued it (the innermost frame outside torch), so a ``.item()``, ``torch.tensor(...)``, ``.sum()`` or ``.to(device)``
added to the per-step path fails here."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import static
from tiny_models import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

import skipprofiler.runtime
from skipprofiler.arch.compat import cache_kwargs, cache_out
from skipprofiler.plan.model import LinearMaps
from skipprofiler.runtime import apply_plan

RUNTIME = str(Path(skipprofiler.runtime.__file__).parent)
TORCH = str(Path(torch.__file__).parent)
METADATA_ONLY = {"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "as_strided"}  # no kernel, no data


class RuntimeOps(TorchDispatchMode):
    """Records the aten ops issued from skipprofiler.runtime code, and `.tolist()` calls made there."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    @staticmethod
    def from_runtime(depth: int) -> bool:
        frame = sys._getframe(depth)
        while frame is not None and frame.f_code.co_filename.startswith(TORCH):
            frame = frame.f_back
        return frame is not None and frame.f_code.co_filename.startswith(RUNTIME)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        if name not in METADATA_ONLY and self.from_runtime(2):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def decode_step_ops(model, plan, steps: int = 3) -> list[str]:
    """The runtime's ops during the last of `steps` decode steps after a 5-token prompt."""
    ids = torch.randint(2, 90, (2, 5), generator=torch.Generator().manual_seed(0))
    tolist = torch.Tensor.tolist
    ops = RuntimeOps()
    calls: list[str] = []

    def watched_tolist(self, *a, **k):
        if RuntimeOps.from_runtime(2):
            calls.append("tolist")
        return tolist(self, *a, **k)

    with apply_plan(model, plan), torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **cache_kwargs(model, DynamicCache()))
        cache, token = cache_out(out), out.logits[:, -1:].argmax(-1)
        for step in range(steps):
            if step == steps - 1:
                torch.Tensor.tolist = watched_tolist
                try:
                    with ops:
                        out = model(input_ids=token, use_cache=True, **cache_kwargs(model, cache))
                finally:
                    torch.Tensor.tolist = tolist
            else:
                out = model(input_ids=token, use_cache=True, **cache_kwargs(model, cache))
            cache, token = cache_out(out), out.logits[:, -1:].argmax(-1)
    return ops.ops + calls


def linear_plan(model, layers):
    hidden = model.config.hidden_size
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in layers:
        tensors[f"{layer}.weight"] = rng.normal(size=(hidden, hidden)).astype(np.float32) * 0.01
        tensors[f"{layer}.bias"] = np.zeros(hidden, np.float32)
    return static(layers, compensation="linear", linear=LinearMaps(None, tensors))


def test_a_static_decode_step_issues_only_the_fills():
    model = tiny_model("llama", num_layers=6)
    zeros = decode_step_ops(model, static([2, 3]))
    assert sorted(zeros) == ["new_zeros", "new_zeros"]  # one fill per skipped FFN, nothing else
    assert decode_step_ops(model, static([])) == []  # an empty plan adds no op at all
    mean = decode_step_ops(model, static([2, 3], compensation="mean_output",
                                         ffn_mean={l: [0.1] * model.config.hidden_size for l in (2, 3)}))
    assert sorted(set(mean)) == ["_to_copy", "clone", "expand"] or sorted(set(mean)) == ["clone", "expand"]
    assert "_local_scalar_dense" not in mean and "lift_fresh" not in mean
    linear = decode_step_ops(model, linear_plan(model, [2, 3]))
    assert sorted(linear) == ["addmm", "addmm"]


@pytest.mark.parametrize("forbidden", ["_local_scalar_dense", "lift_fresh", "tolist"])
def test_the_guard_sees_a_sync_the_runtime_would_add(forbidden, monkeypatch):
    """The recorder is not blind: a per-step ``.item()``, ``torch.tensor`` or ``.tolist()`` in the runtime shows."""
    from skipprofiler.runtime import schedule

    original = schedule.decode_step

    probes = {"_local_scalar_dense": "probe.sum().item()", "lift_fresh": "torch.tensor([1.0])",
              "tolist": "probe.tolist()"}
    source = (f"def planned_with_a_sync(*args, **kwargs):\n    forward = original(*args, **kwargs)\n"
              f"    probe = torch.ones(1)\n    {probes[forbidden]}\n    return forward\n")
    namespace = {"original": original, "torch": torch}
    exec(compile(source, str(Path(schedule.__file__)), "exec"), namespace)  # as if written in the runtime
    planned_with_a_sync = namespace["planned_with_a_sync"]

    monkeypatch.setattr("skipprofiler.runtime.handle.decode_step", planned_with_a_sync)
    model = tiny_model("llama", num_layers=4)
    assert forbidden in decode_step_ops(model, static([1]))
