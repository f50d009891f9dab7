"""The registry finds the right FFN for every architecture: skipping it == zeroing its output projection."""

from __future__ import annotations

import pytest
import torch
from tiny_models import MODEL_TYPES, tiny_model
from torch import nn

from skipprofiler.arch.registry import (
    POST_NORM_OUTPUT,
    RESIDUAL_INSIDE,
    UnsupportedArchitecture,
    model_fingerprint,
    resolve,
)

IDS = torch.tensor([[5, 17, 33, 2, 70, 41, 9, 12], [8, 8, 90, 3, 61, 27, 44, 15]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _skip_forward(site):
    """A forward that makes the FFN contribute nothing (Bloom's MLP must hand back the residual it adds to)."""
    if site.contribution == RESIDUAL_INSIDE:
        return lambda hidden_states, residual: residual
    if site.ffn is None:  # OPT: fc2 maps [B*S, ffn_dim] -> [B*S, H]
        return lambda x: x.new_zeros(x.shape[:-1] + (site.fc2.out_features,))
    return lambda hidden_states, *args, **kwargs: torch.zeros_like(hidden_states)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_skipping_the_found_ffn_equals_zeroing_its_output_weights(model_type):
    model = tiny_model(model_type)
    resolved = resolve(model)
    assert resolved.num_layers == 4 and not resolved.guessed
    skip = [1, 2]
    dense = _logits(model)
    for i in skip:
        site = resolved.sites[i]
        target = site.fc2 if site.ffn is None else site.ffn  # OPT: fc2 of the inline fc1/fc2 pair
        target.forward = _skip_forward(site)
    skipped = _logits(model)
    for i in skip:
        site = resolved.sites[i]
        del (site.fc2 if site.ffn is None else site.ffn).forward  # back to the class's forward
    assert torch.equal(_logits(model), dense)
    with torch.no_grad():
        for i in skip:
            weights = resolved.sites[i].ffn_weights()
            assert weights, f"{model_type}: no output projection found"
            for module, name in weights:
                getattr(module, name).zero_()
    zeroed = _logits(model)
    assert not torch.equal(skipped, dense)  # the FFNs mattered
    assert torch.equal(skipped, zeroed), f"{model_type}: max |dlogits| {(skipped - zeroed).abs().max():.3g}"


@pytest.mark.parametrize("model_type", ["gemma2", "olmo2", "granite", "bloom", "opt", "falcon"])
def test_contribution_kinds_are_bound_to_the_model(model_type):
    resolved = resolve(tiny_model(model_type))
    site = resolved.sites[0]
    if model_type in ("gemma2", "olmo2"):
        assert site.contribution == POST_NORM_OUTPUT and site.post_norm is site.layer.post_feedforward_layernorm
    if model_type == "granite":
        assert site.multiplier == 0.5
    if model_type == "bloom":
        assert site.contribution == RESIDUAL_INSIDE
    if model_type == "opt":
        assert site.ffn is None and site.fc1 is site.layer.fc1 and site.fc2 is site.layer.fc2
    if model_type == "falcon":
        assert site.ffn_output_mutated and resolved.residual_form == "parallel"


class _Block(nn.Module):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, 16), nn.ReLU(), nn.Linear(16, hidden))

    def forward(self, x):
        return x + self.mlp(x)


class _Config:
    def __init__(self, model_type: str):
        self.model_type = model_type
        self.hidden_size = 8
        self.vocab_size = 11

    def to_dict(self):
        return dict(vars(self))


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block(), _Block()])


class _Unregistered(nn.Module):
    def __init__(self, model_type: str = "my_new_lm", with_layers: bool = True):
        super().__init__()
        self.config = _Config(model_type)
        if with_layers:
            self.model = _Inner()
        else:
            self.blocks = nn.ModuleList([nn.Linear(8, 8)])


def test_structural_fallback_finds_layers_mlp_on_an_unregistered_model(caplog):
    model = _Unregistered()
    resolved = resolve(model)
    assert resolved.guessed and resolved.num_layers == 3
    assert [s.ffn for s in resolved.sites] == [layer.mlp for layer in model.model.layers]
    assert "not in the architecture registry" in caplog.text
    assert model_fingerprint(model)["num_layers"] == 3


def test_model_without_the_shape_fails_naming_its_type():
    with pytest.raises(UnsupportedArchitecture, match="unknown architecture 'strange_lm'"):
        resolve(_Unregistered("strange_lm", with_layers=False))


def test_registered_type_with_the_wrong_class_fails_clearly():
    model = tiny_model("llama")
    with pytest.raises(UnsupportedArchitecture, match="is it a causal LM"):
        resolve(_Unregistered("llama", with_layers=False))
    assert resolve(model).model_type == "llama"


def test_fingerprint_ignores_names_but_not_sizes():
    a, b = tiny_model("llama"), tiny_model("llama", seed=3)
    b.config._name_or_path = "/somewhere/else"
    assert model_fingerprint(a) == model_fingerprint(b)
    c = tiny_model("llama", intermediate_size=64)
    fa, fc = model_fingerprint(a), model_fingerprint(c)
    assert fa["config_hash"] != fc["config_hash"]
    assert (fa["model_type"], fa["num_layers"], fa["hidden_size"], fa["vocab_size"]) == ("llama", 4, 32, 96)
