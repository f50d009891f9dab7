"""FFNCapture reads the right tensors: the captured contribution is exactly what the FFN adds to the stream."""

from __future__ import annotations

import pytest
import torch
from tiny_models import MODEL_TYPES, tiny_model

from skipprofiler.arch.capture import FFNCapture, LayerTensors
from skipprofiler.arch.registry import resolve

IDS = torch.tensor([[5, 17, 33, 2, 70, 41, 9, 12], [8, 8, 90, 3, 61, 27, 44, 15]])


def _capture(model) -> dict[int, LayerTensors]:
    seen: dict[int, LayerTensors] = {}
    with FFNCapture(model, lambda t: seen.__setitem__(t.index, t)), torch.no_grad():
        model(IDS)
    return seen


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_contribution_is_what_the_ffn_adds_to_the_stream(model_type):
    """Zero one FFN's output projection: the layer's output drops by exactly the captured contribution."""
    model = tiny_model(model_type)
    layer = 2
    full = _capture(model)
    assert sorted(full) == [0, 1, 2, 3]
    t = full[layer]
    for tensor in (t.ffn_input, t.ffn_output, t.contribution, t.stream_out):
        assert tensor.shape == (2, 8, model.config.hidden_size if hasattr(model.config, "hidden_size")
                                else model.config.n_embd)
    assert t.contribution.abs().max() > 0
    with torch.no_grad():
        for module, name in resolve(model).sites[layer].ffn_weights():
            getattr(module, name).zero_()
    ablated = _capture(model)[layer]
    assert torch.allclose(ablated.contribution, torch.zeros_like(ablated.contribution), atol=1e-6)
    # Same layer input in both runs (only this layer's FFN changed), so the outputs differ by the contribution.
    assert torch.allclose(t.stream_out - ablated.stream_out, t.contribution, atol=2e-5, rtol=1e-4)
    assert torch.allclose(t.stream_in_ffn, ablated.stream_out, atol=2e-5, rtol=1e-4)


def test_hooks_are_removed_and_disabled_capture_sees_nothing():
    model = tiny_model("falcon")
    modules = list(model.modules())
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
    seen: list[int] = []
    with FFNCapture(model, lambda t: seen.append(t.index)) as capture, torch.no_grad():
        assert sum(len(m._forward_hooks) for m in modules) > before
        capture.enabled = False
        model(IDS)
        assert seen == []
        capture.enabled = True
        model(IDS)
        assert seen == [0, 1, 2, 3]
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules) == before


def test_falcon_ffn_output_is_copied_before_the_in_place_add():
    """Falcon adds attention into the MLP's returned tensor: the capture must hold the MLP's own output."""
    model = tiny_model("falcon")
    t = _capture(model)[1]
    site = resolve(model).sites[1]
    with torch.no_grad():
        expected = site.ffn(t.ffn_input)
    assert torch.allclose(t.ffn_output, expected, atol=1e-6)


def test_granite_contribution_is_scaled_by_the_residual_multiplier():
    model = tiny_model("granite")
    t = _capture(model)[0]
    assert torch.allclose(t.contribution, t.ffn_output * 0.5)
