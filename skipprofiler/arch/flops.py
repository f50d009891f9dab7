"""FLOPs per decoded token of a model (`token_flops`) and what they add up to at a cache length (`FlopModel`): the
one count behind every FLOP-ideal speedup and every "decode FLOPs saved" (eval rows and baselines, `--refine`'s
substitute cost, the benchmarks), for whole-FFN skips, linear substitutes and neuron subsets alike."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .registry import resolve


def _linear_flops(module: nn.Module) -> int:
    """Multiply-add FLOPs of the linear maps in `module` for one position: nn.Linear and transformers' Conv1D (GPT-2,
    its weight transposed)."""
    return sum(2 * m.weight.numel() for m in module.modules()
               if isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf")))


def token_flops(model: nn.Module) -> dict[str, float]:
    """Per decoded token: FFN FLOPs per layer, attention projection FLOPs per layer, attention-over-cache FLOPs per
    layer and cached position, LM-head FLOPs, and the layer count."""
    arch = resolve(model)
    site = arch.sites[0]
    ffn = sum(_linear_flops(m) for m in site.ffn_modules)
    if ffn == 0:  # fused experts keep raw parameters: count the experts a token actually uses
        config = model.config
        per_expert = sum(2 * p[0].numel() for n, p in site.ffn.named_parameters() if "experts" in n)
        ffn = per_expert * getattr(config, "num_experts_per_tok", 1)
    attn_proj = _linear_flops(site.layer) - ffn
    config = model.config
    heads = getattr(config, "num_attention_heads")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    head = model.get_output_embeddings()
    return {"ffn": float(ffn), "attn_proj": float(attn_proj), "attn_per_position": float(4 * heads * head_dim),
            "lm_head": float(2 * head.weight.numel()), "layers": float(arch.num_layers)}


@dataclass
class FlopModel:
    """FLOPs of one decoded token at a given cache length, from `token_flops`: attention projections and attention
    over the cache per layer, the FFN per layer, and the LM head."""

    flops: dict[str, float]

    @classmethod
    def of(cls, model: nn.Module) -> "FlopModel":
        return cls(token_flops(model))

    @property
    def lm_head(self) -> float:
        return self.flops["lm_head"]

    def block(self, context: int) -> float:
        """One whole decoder layer (attention, its cache, the FFN)."""
        f = self.flops
        return f["attn_proj"] + f["attn_per_position"] * context + f["ffn"]

    def per_token(self, ffn_layers: float, context: int) -> float:
        """Every layer's attention, `ffn_layers` FFN calls and the LM head."""
        f = self.flops
        attention = f["layers"] * (f["attn_proj"] + f["attn_per_position"] * context)
        return attention + ffn_layers * f["ffn"] + f["lm_head"]

    def ffn_flops_saved(self, stats: dict) -> float:
        """FFN FLOPs a run did not compute, net of substitutes, from the runtime's `handle.stats()`: its
        `ffn_flops_saved_share` of the FFN FLOPs of its decode positions (after warm-up) x layers."""
        calls = stats.get("decode_positions", 0) * self.flops["layers"]
        return float(stats.get("ffn_flops_saved_share", 0.0)) * calls * self.flops["ffn"]

    def decode_saved_share(self, ffn_saved_share: float, context: int) -> float:
        """The share of a decode token's FLOPs (every layer's attention and its cache, the FFNs, the LM head) saved
        when `ffn_saved_share` of its FFN FLOPs are not computed, net of what replaces them. One count for every
        plan kind: whole-FFN skips (the FFN's FLOPs), their linear maps (less the map's FLOPs) and neuron subsets (the
        dropped neurons' FLOPs, less the mean bias's adds) all enter as FFN FLOPs saved, e.g.
        `handle.stats()["ffn_flops_saved_share"]`:
        ffn_saved_share x layers x FFN FLOPs / (layers x (attention + cache x context + FFN) + LM head)."""
        f = self.flops
        return ffn_saved_share * f["layers"] * f["ffn"] / self.per_token(f["layers"], context)

    def ideal_speedup(self, skip_ratio: float, context: int) -> float:
        """Dense FLOPs per token over those with a `skip_ratio` share of the FFN FLOPs not computed (a share of the
        FFN calls skipped, or of FFN FLOPs saved net of substitutes): 1 / (1 - decode_saved_share)."""
        return 1.0 / (1.0 - self.decode_saved_share(skip_ratio, context))
