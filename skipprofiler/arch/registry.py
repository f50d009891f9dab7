"""Architecture registry: where each causal LM keeps its decoder layers and FFNs, and how the FFN joins the stream.

Shared by the profiler and the runtime, so it imports only torch and the standard library (never transformers).

Every architecture is reduced to one picture per decoder layer:

    stream_out = layer(stream_in)            # the tensor the layer returns
    contribution = what the FFN added to the stream on the way (after any post-FFN norm / multiplier)
    h = stream_out - contribution            # the stream entering the FFN sub-block (FFN-SkipLLM's h)

so the FFN-SkipLLM metric is cos(h, h + contribution) = cos(stream_out - contribution, stream_out) for every residual
form: sequential pre-norm, sandwich norms (Gemma 2/3), post-FFN norm (OLMo 2), parallel attention+FFN (GPT-NeoX,
GPT-J, Falcon), Bloom's residual-inside-MLP and OPT's inline fc1/fc2.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger("skipprofiler")

# How the FFN contribution is read off a layer:
FFN_OUTPUT = "ffn_output"  # the FFN module's output is added to the stream as is (times `multiplier_attr`)
POST_NORM_OUTPUT = "post_norm_output"  # the FFN output goes through `post_norm` before the add (Gemma 2/3, OLMo 2)
RESIDUAL_INSIDE = "residual_inside"  # the FFN module gets (x, residual) and returns residual + contribution (Bloom)
CONTRIBUTIONS = (FFN_OUTPUT, POST_NORM_OUTPUT, RESIDUAL_INSIDE)


class UnsupportedArchitecture(ValueError):
    """The model's layout is not in the registry and the structural fallback could not find it."""


@dataclass(frozen=True)
class ArchSpec:
    """How one family of models lays out its FFN. Paths are attribute paths, dotted, relative to the named root."""

    layers: str  # from the top-level model, e.g. "model.layers"
    ffn: str = "mlp"  # from a layer; for OPT the pair "fc1,fc2" (no FFN module: fc1 -> activation -> fc2)
    contribution: str = FFN_OUTPUT
    post_norm: str | None = None  # module (from a layer) that normalises the FFN output before the add
    multiplier_attr: str | None = None  # config attribute scaling the FFN output before the add (Granite)
    residual: str | Callable[[Any], str] = "sequential"  # documentation + compensation support: see residual_form()
    ffn_output_mutated: bool = False  # Falcon adds attention into the returned MLP tensor in place
    notes: str = ""

    def residual_form(self, config) -> str:
        return self.residual(config) if callable(self.residual) else self.residual


def _neox_residual(config) -> str:
    return "parallel" if getattr(config, "use_parallel_residual", True) else "sequential"


def _falcon_residual(config) -> str:
    if getattr(config, "new_decoder_architecture", False) or getattr(config, "parallel_attn", True):
        return "parallel"
    return "sequential"


def _opt_residual(config) -> str:
    return "sequential" if getattr(config, "do_layer_norm_before", True) else "post_norm_block"


_LLAMA_LIKE = ArchSpec(layers="model.layers", notes="sequential pre-norm: h += mlp(post_attention_layernorm(h))")
_SANDWICH = ArchSpec(layers="model.layers", contribution=POST_NORM_OUTPUT, post_norm="post_feedforward_layernorm",
                     residual="sandwich", notes="h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))")
_MOE = ArchSpec(layers="model.layers", notes="sequential; the FFN is the whole sparse-MoE block (router + experts)")

REGISTRY: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "granite": ArchSpec(layers="model.layers", multiplier_attr="residual_multiplier",
                        notes="h += residual_multiplier * mlp(norm(h))"),
    "gemma2": _SANDWICH,
    "gemma3_text": _SANDWICH,
    "olmo2": ArchSpec(layers="model.layers", contribution=POST_NORM_OUTPUT, post_norm="post_feedforward_layernorm",
                      residual="post_ffn_norm", notes="h += post_feedforward_layernorm(mlp(h)): the FFN reads the raw stream"),
    "gpt2": ArchSpec(layers="transformer.h", notes="sequential pre-norm: h += mlp(ln_2(h))"),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", residual=_neox_residual,
                         notes="parallel by default: out = x + attn(ln1(x)) + mlp(ln2(x))"),
    "gptj": ArchSpec(layers="transformer.h", residual="parallel", notes="parallel, one shared LN"),
    "falcon": ArchSpec(layers="transformer.h", residual=_falcon_residual, ffn_output_mutated=True,
                       notes="parallel by default; the MLP output is modified in place after the module returns"),
    "bloom": ArchSpec(layers="transformer.h", contribution=RESIDUAL_INSIDE, residual="residual_inside",
                      notes="mlp(x, residual) returns residual + dense_4h_to_h(...)"),
    "opt": ArchSpec(layers="model.decoder.layers", ffn="fc1,fc2", residual=_opt_residual,
                    notes="no FFN module: fc1 -> activation -> fc2 inline on flattened [B*S, H]"),
    "mixtral": _MOE,
    "qwen2_moe": _MOE,
    "qwen3_moe": _MOE,
}


def _get(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _try_get(root: Any, path: str) -> Any:
    try:
        return _get(root, path)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


_FALLBACK_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "transformer.layers",
                         "gpt_neox.layers", "model.language_model.layers", "language_model.model.layers")


@dataclass
class FFNSite:
    """One decoder layer's FFN: the modules to wrap or hook, and how its contribution reaches the stream."""

    index: int
    layer: nn.Module
    ffn: nn.Module | None  # None for OPT (fc1/fc2 inline)
    fc1: nn.Module | None = None
    fc2: nn.Module | None = None
    post_norm: nn.Module | None = None
    multiplier: float = 1.0
    contribution: str = FFN_OUTPUT
    ffn_output_mutated: bool = False

    @property
    def ffn_modules(self) -> list[nn.Module]:
        return [self.ffn] if self.ffn is not None else [self.fc1, self.fc2]

    def ffn_weights(self) -> list[tuple[nn.Module, str]]:
        """The FFN's output projection(s): zeroing these (weight and bias) is the reference for 'FFN skipped'."""
        if self.fc2 is not None:
            return [(self.fc2, "weight"), (self.fc2, "bias")]
        out = []
        for name, mod in self.ffn.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in OUTPUT_PROJECTIONS:
                out += [(mod, p) for p, _ in mod.named_parameters(recurse=False)]
        # Fused experts keep their output projection as a parameter of the experts module (e.g. `experts.down_proj`),
        # also next to a shared expert's `down_proj` Linear (qwen2_moe): collect both kinds.
        out += [(mod, p) for name, mod in self.ffn.named_modules() for p, _ in mod.named_parameters(recurse=False)
                if p in OUTPUT_PROJECTIONS]
        return out


# Output projections by name; a gate such as qwen2_moe's `shared_expert_gate` is not one (sigmoid(0) = 0.5).
OUTPUT_PROJECTIONS = {"down_proj", "c_proj", "fc_out", "dense_4h_to_h", "fc2", "w2", "proj_out"}


@dataclass
class ResolvedArch:
    """The registry entry bound to one model instance."""

    model_type: str
    spec: ArchSpec
    layers: nn.ModuleList
    sites: list[FFNSite] = field(default_factory=list)
    guessed: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.sites)

    @property
    def residual_form(self) -> str:
        return self.spec.residual_form(self._config)

    _config: Any = None


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def resolve(model: nn.Module) -> ResolvedArch:
    """Bind the registry entry (or the structural fallback) to `model`; raise UnsupportedArchitecture if neither fits."""
    model_type = model_type_of(model)
    spec = REGISTRY.get(model_type)
    guessed = False
    if spec is not None:
        layers = _try_get(model, spec.layers)
        if layers is None:
            raise UnsupportedArchitecture(
                f"model_type {model_type!r} is registered with layers at {spec.layers!r}, but {type(model).__name__} "
                f"has no such attribute (is it a causal LM, e.g. AutoModelForCausalLM?)")
    else:
        layers, path = None, None
        for path in _FALLBACK_LAYER_PATHS:
            cand = _try_get(model, path)
            if isinstance(cand, nn.ModuleList) and len(cand) > 0 and all(
                    isinstance(getattr(layer, "mlp", None), nn.Module) for layer in cand):
                layers = cand
                break
        if layers is None:
            raise UnsupportedArchitecture(
                f"unknown architecture {model_type!r} ({type(model).__name__}): no decoder layers with an `.mlp` module "
                f"at any of {', '.join(_FALLBACK_LAYER_PATHS)}. Add an ArchSpec for it to skipprofiler.arch.registry.REGISTRY "
                f"(or call skipprofiler.arch.registry.register({model_type!r}, ArchSpec(layers=..., ffn=...))).")
        spec = ArchSpec(layers=path, notes="structural fallback: layers[i].mlp, sequential residual assumed")
        guessed = True
        log.warning("skipprofiler: %r is not in the architecture registry; guessing FFN = %s[i].mlp with a sequential "
                    "residual. Check the guess before trusting plans: the logits with a static plan skipping layer i "
                    "must equal the logits with that layer's FFNSite.ffn_weights() zeroed (weight and bias); else "
                    "register an ArchSpec (skipprofiler.arch.registry.register).", model_type, path)

    config = getattr(model, "config", None)
    multiplier = float(getattr(config, spec.multiplier_attr)) if spec.multiplier_attr else 1.0
    sites = []
    for i, layer in enumerate(layers):
        if "," in spec.ffn:
            a, b = spec.ffn.split(",")
            fc1, fc2 = _try_get(layer, a), _try_get(layer, b)
            if fc1 is None or fc2 is None:
                raise UnsupportedArchitecture(f"{model_type}: layer {i} has no {spec.ffn!r}")
            site = FFNSite(i, layer, None, fc1=fc1, fc2=fc2)
        else:
            ffn = _try_get(layer, spec.ffn)
            if not isinstance(ffn, nn.Module):
                raise UnsupportedArchitecture(f"{model_type}: layer {i} has no FFN module at {spec.ffn!r}")
            site = FFNSite(i, layer, ffn)
        if spec.post_norm:
            site.post_norm = _get(layer, spec.post_norm)
        site.multiplier = multiplier
        site.contribution = spec.contribution
        site.ffn_output_mutated = spec.ffn_output_mutated
        sites.append(site)
    resolved = ResolvedArch(model_type, spec, layers, sites, guessed)
    resolved._config = config
    return resolved


def register(model_type: str, spec: ArchSpec, overwrite: bool = False) -> None:
    """Add an architecture (e.g. from user code) without editing the package."""
    if model_type in REGISTRY and not overwrite:
        raise ValueError(f"{model_type!r} is already registered; pass overwrite=True to replace it")
    REGISTRY[model_type] = spec


def first_tensor(x: Any) -> torch.Tensor:
    """Decoder layers and FFNs return a tensor in transformers 5, a tuple in some models: take the hidden states."""
    return x[0] if isinstance(x, (tuple, list)) else x


def model_fingerprint(model: nn.Module) -> dict:
    """What a plan/profile is valid for: model_type, sizes and a hash of the architecture-defining config."""
    resolved_layers = None
    try:
        resolved_layers = resolve(model).num_layers
    except UnsupportedArchitecture:
        pass
    return config_fingerprint(getattr(model, "config", None), resolved_layers, model_type_of(model))


def config_fingerprint(config: Any, num_layers: int | None, model_type: str | None = None) -> dict:
    """`model_fingerprint` from a config alone (servers that load the weights themselves, e.g. vLLM, have the same
    transformers config): `num_layers` as the caller resolved it."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else {}
    # Keys that do not change the computation (names, paths, dtype, generation/tokenizer ids) stay out of the hash;
    # so does a GGUF file's quantization record: its weights are dequantized, the same as the folder they were saved to.
    ignore = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
              "_commit_hash", "use_cache", "output_hidden_states", "output_attentions", "return_dict", "pad_token_id",
              "bos_token_id", "eos_token_id", "_attn_implementation", "_attn_implementation_internal",
              "_experts_implementation", "attn_implementation", "tie_word_embeddings_internal", "id2label", "label2id",
              "problem_type", "tokenizer_class", "task_specific_params", "generation_config",
              "quantization_config"}
    stable = {k: v for k, v in sorted(cfg.items()) if k not in ignore and not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {
        "model_type": model_type or getattr(config, "model_type", None),
        "num_layers": num_layers,
        "hidden_size": getattr(config, "hidden_size", None) or getattr(config, "n_embd", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "config_hash": digest,
    }
