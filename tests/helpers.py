"""Helpers several test files share, each written once: the CLI run in-process, tokenizers and corpora, synthetic
profiles, model drivers (decode loops, generate, padded batches) and the references the runtime is checked against.

The references are independent of the runtime: they apply a plan's rule (plan.py) with plain hooks or by zeroing
weights. The adaptive rule is walked by one class, `AdaptiveRule`, that every adaptive reference drives.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import torch
from tiny_models import tiny_model
from transformers import DynamicCache

from skipprofiler._cli.main import main as _cli_main
from skipprofiler.arch.compat import cache_in, cache_kwargs
from skipprofiler.arch.capture import FFNCapture
from skipprofiler.evaluation.fidelity import make_batches
from skipprofiler.plan.model import LinearMaps, PlanFile, SkipPlan
from skipprofiler.profile import METRICS, Profile
from skipprofiler.arch.registry import (
    OUTPUT_PROJECTIONS,
    RESIDUAL_INSIDE,
    first_tensor,
    model_fingerprint,
    resolve,
)

# ---- the CLI in-process and profile comparisons -----------------------------------------------------------------------


def run(argv: list, capsys) -> tuple[int, str, str]:
    """Run the `skipprof` CLI in-process: (exit code, stdout, stderr)."""
    try:
        _cli_main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err



MEAN_RTOL = 1e-12

M2_RTOL = 1e-10

ATOL = 1e-15



def assert_same_statistics(a: Profile, b: Profile) -> None:
    """Same classes, exactly the same counts and histograms, means and m2 equal up to merge rounding."""
    assert a.classes == b.classes
    assert np.array_equal(a.count, b.count) and np.array_equal(a.token_count, b.token_count)
    for m in METRICS:
        assert np.array_equal(a.hist[m], b.hist[m]), m
        assert np.array_equal(a.nonfinite[m], b.nonfinite[m]), m
        np.testing.assert_allclose(a.mean[m], b.mean[m], rtol=MEAN_RTOL, atol=ATOL, err_msg=m)
        np.testing.assert_allclose(a.m2[m], b.m2[m], rtol=M2_RTOL, atol=ATOL, err_msg=m)


# ---- tokenizers and corpora -------------------------------------------------------------------------------------------


def word_tokenizer(vocab_size: int = 96, chat: bool = False):
    """A real fast tokenizer over words w0..w{n-1} (no download): 'w5 w7' -> [5, 7]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(2, vocab_size)}
    vocab.update({"[UNK]": 0, "[EOS]": 1})  # special tokens must not be substrings of words
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[UNK]", eos_token="[EOS]")
    if chat:
        tok.chat_template = "{% for m in messages %}w2 {{ m['content'] }} w3 {% endfor %}"
    return tok



def words(n: int, start: int = 4) -> str:
    return " ".join(f"w{(start + i) % 90 + 4}" for i in range(n))



def write_jsonl(path: Path, records: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path



WORDS = ("the river ran past the old mill while the miller slept and the wheel turned slowly in the dark water "
         "def main(): return sum(x for x in range(10)) if ready else None  # count the items ").split()



def char_tokenizer():
    """A character-level fast tokenizer with ids < 128 (tiny models here use vocab_size=128)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1}
    vocab.update({chr(c): c - 30 for c in range(32, 127)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")



def write_corpus(path: Path, docs_per_class: int = 3, words: int = 40) -> Path:
    rows = []
    for c, cls in enumerate(("prose", "code")):
        for d in range(docs_per_class):
            text = " ".join(WORDS[(c * 17 + d * 5 + i) % len(WORDS)] for i in range(words))[:max(4 * words, 4)]
            rows.append({"text": text, "class": cls, "source": "test"})
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return path



def write_word_corpus(folder: Path) -> tuple[Path, Path]:
    """A tiny model with a word-level tokenizer ('w5 w9' -> [5, 9]) and a 3-class jsonl.gz corpus."""
    import gzip
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model_dir = folder / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 96)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[UNK]",
                            eos_token="w1").save_pretrained(model_dir)
    data = folder / "data.jsonl.gz"
    with gzip.open(data, "wt") as f:
        for i in range(18):
            words = " ".join(f"w{(i * 7 + j) % 90 + 4}" for j in range(5 + (i * 7) % 30))
            f.write(json.dumps({"text": words, "class": "abc"[i % 3]}) + "\n")
    return model_dir, data


# ---- profiles ---------------------------------------------------------------------------------------------------------


BASE_CURVE = (0.80, 0.86, 0.90, 0.93, 0.95, 0.96, 0.97, 0.975, 0.97, 0.96, 0.94, 0.75)



def synthetic_profile(class_curves: dict[str, tuple[float, ...]], tokens: dict[str, int] | None = None,
                      regimes: tuple[str, ...] = ("prompt", "decode"), spread: float = 0.02, reservoir: int = 1500,
                      hidden: int = 8, docs: int = 20, seed: int = 0) -> Profile:
    """A Profile whose per-token residual cosines are Normal(curve[l], spread) per class (clipped below 1)."""
    rng = np.random.default_rng(seed)
    classes = list(class_curves)
    L = len(next(iter(class_curves.values())))
    R, C, K = 2, len(classes), reservoir
    edges = {m: np.linspace(0.0, 2.0, 401) if m in ("norm_ratio", "stream_gain") else np.linspace(-1.0, 1.0, 2001)
             for m in METRICS}
    hist = {m: np.zeros((R, L, C, len(edges[m]) + 1), np.int64) for m in METRICS}
    mean = {m: np.zeros((R, L, C)) for m in METRICS}
    m2 = {m: np.zeros((R, L, C)) for m in METRICS}
    nonfinite = {m: np.zeros((R, L, C), np.int64) for m in METRICS}
    count = np.zeros((R, L, C), np.int64)
    res = np.zeros((R, C, K, L), np.float32)
    res_gain = np.zeros((R, C, K, L), np.float32)
    res_len = np.zeros((R, C), np.int64)
    for r, regime in enumerate(("prompt", "decode")):
        if regime not in regimes:
            continue
        for c, name in enumerate(classes):
            n = (tokens or {}).get(name, K)
            cos = np.clip(np.asarray(class_curves[name]) + spread * rng.standard_normal((n, L)), -1, 0.99995)
            gain = 1.0 + 0.1 * rng.random((n, L))
            values = {"residual": cos, "ffn_io": cos * 0.5, "norm_ratio": gain - 0.9, "stream_gain": gain}
            for m, v in values.items():
                idx = np.searchsorted(edges[m], v, side="right")  # 0 = underflow, len(edges) = overflow
                for l in range(L):
                    hist[m][r, l, c] = np.bincount(idx[:, l], minlength=len(edges[m]) + 1)
                mean[m][r, :, c] = v.mean(axis=0)
                m2[m][r, :, c] = ((v - v.mean(axis=0)) ** 2).sum(axis=0)
            count[r, :, c] = n
            keep = min(n, K)
            res[r, c, :keep] = cos[:keep]
            res_gain[r, c, :keep] = gain[:keep]
            res_len[r, c] = keep
    centers = rng.standard_normal((C, hidden)) * 3
    features = (centers[:, None, :] + rng.standard_normal((C, docs, hidden))).astype(np.float32)
    header = {"format": "skipprof-profile", "format_version": 1,
              "model": {"name": "synthetic", "fingerprint": {"model_type": "llama", "num_layers": L,
                                                             "hidden_size": hidden, "vocab_size": 96,
                                                             "config_hash": "feedbeef"},
                        "max_position_embeddings": 512},
              "corpus": [{"spec": "synthetic", "sha256": "0" * 64}], "partial": False,
              "reservoir_size": K, "seed": seed}
    return Profile(header=header, classes=classes, edges=edges, hist=hist, count=count, mean=mean, m2=m2,
                   nonfinite=nonfinite, reservoir=res, reservoir_gain=res_gain, reservoir_len=res_len,
                   reservoir_keys=rng.random((R, C, K)), router_layer=L // 2, doc_features=features,
                   doc_len=np.full(C, docs, np.int64), doc_keys=rng.random((C, docs)))


# ---- plans and model drivers ------------------------------------------------------------------------------------------


def static(layers, **kw) -> SkipPlan:
    return SkipPlan(mode="static", skip_layers={l: 1.0 for l in layers} if isinstance(layers, list) else layers, **kw)



def plan_file(model, global_plan, classes=None, router=None) -> PlanFile:
    return PlanFile(model={"name": "tiny", "fingerprint": model_fingerprint(model)}, global_plan=global_plan,
                    classes=classes or {}, router=router)



def hidden_size(model) -> int:
    return model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd



def random_maps(model, layers, rank=None, scale=0.05, seed=0) -> LinearMaps:
    g = torch.Generator().manual_seed(seed)
    h, tensors = hidden_size(model), {}
    for l in layers:
        tensors[f"{l}.bias"] = (torch.randn(h, generator=g) * 0.1).numpy()
        if rank is None:
            tensors[f"{l}.weight"] = (torch.randn(h, h, generator=g) * scale).numpy()
        else:
            tensors[f"{l}.down"] = (torch.randn(h, rank, generator=g) * scale).numpy()
            tensors[f"{l}.up"] = (torch.randn(rank, h, generator=g) * scale).numpy()
    return LinearMaps(rank, tensors)



def left_padded(batch=3, length=7, vocab=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, : b * 2] = 0  # row b has b*2 left pads
        ids[b, : b * 2] = 0
    return ids, mask



def token_batches(n_docs=10, length=24, prompt_len=6, seed=5):
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(2, 96, (length,), generator=g).tolist() for _ in range(n_docs)]
    return make_batches(tokens, ["x"] * n_docs, prompt_len=prompt_len, pad_id=0, batch_size=4)



def greedy_loop(model, ids, steps, mask=None):
    """Hand-written decode loop with a KV cache; returns the per-step logits [steps, B, V] and the tokens."""
    cache = DynamicCache()
    logits, tokens = [], []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = model(input_ids=nxt, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits), torch.cat(tokens, 1)



def decode_loop(model, ids, steps, reference=None):
    """Greedy bs-1 decode with a cache, telling `reference` each forward's decode index."""
    cache, logits, tokens = DynamicCache(), [], []
    with torch.no_grad():
        out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
        for d in range(steps):
            tokens.append(out.logits[:, -1:].argmax(-1))
            if reference is not None:
                reference.d = d
            out = model(input_ids=tokens[-1], **cache_kwargs(model, cache), use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits), torch.cat(tokens, 1)



def generate(model, ids, steps, mask=None, **kw):
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                             max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)  # raw logits (scores carry -inf from min_new_tokens)



def untouched(model) -> bool:
    """No hook, instance forward or extra_repr left behind anywhere in the model."""
    for module in model.modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return False
        if "forward" in module.__dict__ or "extra_repr" in module.__dict__:
            return False
    return "_skipprof_handle" not in model.__dict__



def decisions(stats: dict) -> dict:
    """A handle's stats without the rows really not computed (device-state adaptive plans mask, host state gathers)."""
    return {k: v for k, v in stats.items() if k not in ("rows_not_computed", "not_computed_ratio", "ffn_flops_saved_share")}



def pooled(model, ids, layer):
    out = {}
    hook = resolve(model).sites[layer].layer.register_forward_hook(lambda m, a, o: out.setdefault("h", o))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    h = out["h"][0] if isinstance(out["h"], tuple) else out["h"]
    return h.float().mean(1)


# ---- cosines read from dense decoding (thresholds that trigger sometimes) ---------------------------------------------


def layer_cos(model, run) -> dict[int, list[torch.Tensor]]:
    """Per layer, cos(h, h + c) of every position of every forward `run()` makes (Llama-style layers: h is the
    pre-FFN norm's input, h + c the layer's output); one flat tensor per forward."""
    values, hooks = {}, []
    for site in resolve(model).sites:
        def pre(module, args, l=site.index):
            values.setdefault(l, []).append(args[0].clone())

        def post(module, args, out, l=site.index):
            values[l][-1] = torch.nn.functional.cosine_similarity(values[l][-1], out, dim=-1).flatten()
        hooks += [site.layer.post_attention_layernorm.register_forward_pre_hook(pre),
                  site.layer.register_forward_hook(post)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return values


def decode_cos(model, ids, steps) -> dict[int, torch.Tensor]:
    """Per layer, the cos(h, h + c) values seen on dense greedy decode (to place thresholds that trigger sometimes)."""
    values = layer_cos(model, lambda: greedy_loop(model, ids, steps))
    return {l: torch.cat(v[1:]) for l, v in values.items()}  # drop the prompt forward


def token_cos(model, ids) -> torch.Tensor:
    """cos(h, h + c) of each position of one dense forward of a single row: [positions, L]."""
    values = layer_cos(model, lambda: model(input_ids=ids))
    return torch.stack([values[l][0] for l in sorted(values)], dim=1)


def quantile_tau(model, ids, steps, q=0.5) -> list[float]:
    cos = decode_cos(model, ids, steps)
    return [float(cos[l].quantile(q)) for l in sorted(cos)]



def quantile_tau_any(model, ids, steps, q=0.5) -> list[float]:
    """Thresholds from any architecture's dense decode cos (h = stream_out - FFN contribution, read by hooks)."""
    arch, values, hooks = resolve(model), {}, []
    for site in arch.sites:
        target = site.post_norm if site.post_norm is not None else (site.fc2 if site.ffn is None else site.ffn)

        def ffn_out(module, args, out, site=site):
            c = out[0] if isinstance(out, tuple) else out
            if site.contribution == "residual_inside":
                c = c - args[1]
            values.setdefault(site.index, []).append([(c * site.multiplier).reshape(-1, c.shape[-1]).clone()])

        def layer_out(module, args, out, l=site.index):
            stream = (out[0] if isinstance(out, tuple) else out).reshape(values[l][-1][0].shape)
            values[l][-1] = torch.nn.functional.cosine_similarity(stream - values[l][-1][0], stream, dim=-1)

        hooks += [target.register_forward_hook(ffn_out), site.layer.register_forward_hook(layer_out)]
    greedy_loop(model, ids, steps)
    for h in hooks:
        h.remove()
    return [float(torch.cat(values[l][1:]).quantile(q)) for l in sorted(values)]


# ---- references -------------------------------------------------------------------------------------------------------


def output_weights(model, layer: int) -> list[torch.nn.Parameter]:
    """Every output-projection parameter of one FFN (fused MoE experts included): zeroing them zeroes the FFN."""
    site = resolve(model).sites[layer]
    params = {id(getattr(m, n)): getattr(m, n) for m, n in site.ffn_weights() if getattr(m, n) is not None}
    if site.ffn is not None:
        for name, p in site.ffn.named_parameters():
            if set(name.split(".")) & OUTPUT_PROJECTIONS:
                params[id(p)] = p
    return list(params.values())



class ZeroedReference:
    """The plan's effect done the slow, obvious way: zero the skipped FFNs' output weights on decode forwards.

    A model pre-hook reads the cache length, derives the decode index d (d = past - prompt length), asks
    `plan.static_layers_at(d)` which layers skip, and swaps their output weights for zeros for that forward.
    Valid for bs 1 or batches whose rows share d (left padding / generate).
    """

    def __init__(self, model, plan: SkipPlan):
        self.model, self.plan = model, plan
        self.dense = {l: [p.detach().clone() for p in output_weights(model, l)] for l in plan.skip_layers}
        self.prompt = None
        self.handle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_in(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            self.prompt = ids.shape[1]
            skip = []
        else:
            assert ids.shape[1] == 1, "reference handles one new token per forward"
            skip = self.plan.static_layers_at(past - self.prompt)
        with torch.no_grad():
            for l, saved in self.dense.items():
                for p, dense in zip(output_weights(self.model, l), saved):
                    p.copy_(torch.zeros_like(dense) if l in skip else dense)

    def remove(self):
        self.handle.remove()
        with torch.no_grad():
            for l, saved in self.dense.items():
                for p, dense in zip(output_weights(self.model, l), saved):
                    p.copy_(dense)



class LinearReference:
    """The obvious way: on decode forwards (one new token, non-empty cache), each planned FFN's output is replaced
    by x @ W + b of the FFN's own input (forward hooks on the FFN module; OPT: fc1's input, fc2's output)."""

    def __init__(self, model, layers, maps: LinearMaps):
        self.decode, self.inputs = False, {}
        self.handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True)]
        for site in resolve(model).sites:
            if site.index not in layers:
                continue
            t = {k: torch.from_numpy(v) for k, v in maps.layer_tensors(site.index).items()}
            w = t["weight"] if "weight" in t else t["down"] @ t["up"]
            if site.ffn is None:
                self.handles.append(site.fc1.register_forward_pre_hook(self._keep(site.index)))
                self.handles.append(site.fc2.register_forward_hook(self._replace_fc2(site.index, w, t["bias"])))
            else:
                self.handles.append(site.ffn.register_forward_hook(
                    self._replace(w, t["bias"], site.contribution == RESIDUAL_INSIDE), with_kwargs=True))

    def _pre(self, module, args, kwargs):
        cache = cache_in(kwargs)
        self.decode = cache is not None and cache.get_seq_length() > 0

    def _keep(self, layer):
        def fn(module, args):
            self.inputs[layer] = args[0]
        return fn

    def _replace_fc2(self, layer, w, b):
        def fn(module, args, output):
            return self.inputs[layer] @ w + b if self.decode else None
        return fn

    def _replace(self, w, b, residual_inside):
        def fn(module, args, kwargs, output):
            if not self.decode:
                return None
            x = args[0]
            new = x @ w.to(x.dtype) + b.to(x.dtype)
            if residual_inside:
                new = new + (args[1] if len(args) > 1 else kwargs["residual"])
            out = first_tensor(output)
            new = new.reshape(out.shape)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return fn

    def remove(self):
        for h in self.handles:
            h.remove()



class AdaptiveRule:
    """plan.py's adaptive rule for one token, walked layer by layer as its docstring describes: the first layer at or
    after cold_start - 1 that ran densely and passes its threshold (every row of a group deciding together passes)
    starts one run of up to max_skip skipped FFNs, never into the cold layers at either end."""

    def __init__(self, num_layers: int, tau, cold_start: int, cold_end: int, max_skip: int):
        self.tau, self.cold_start, self.max_skip = tau, cold_start, max_skip
        self.end = num_layers - cold_end
        self.start_token()

    @classmethod
    def of(cls, plan: SkipPlan, num_layers: int) -> "AdaptiveRule":
        return cls(num_layers, plan.tau, plan.cold_start, plan.cold_end, plan.max_skip)

    def start_token(self):
        self.run_left, self.run_taken = 0, False

    def skips(self, layer: int) -> bool:
        """Asked before `layer` runs: is its FFN skipped?"""
        if self.cold_start <= layer < self.end and self.run_left > 0:
            self.run_left -= 1
            return True
        return False

    def ran(self, layer: int, cos) -> None:
        """`layer` ran densely and its cos(h, h + c) was `cos` (a value, or one per row of a group)."""
        passes = bool((torch.as_tensor(cos) > torch.tensor(self.tau[layer], dtype=torch.as_tensor(cos).dtype)).all())
        if not self.run_taken and self.cold_start - 1 <= layer and layer + 1 < self.end and passes:
            self.run_left, self.run_taken = self.max_skip, True

    def skipped_of(self, cos_by_layer) -> int:
        """The FFNs skipped for one token whose layers' cosines (per row of a group: [rows, L]) are known up front
        -- exact for cosines read from a dense pass, as a run starts before any FFN of the token is skipped."""
        self.start_token()
        cos_by_layer = torch.as_tensor(np.asarray(cos_by_layer)).reshape(-1, len(self.tau))
        skipped = 0
        for layer in range(len(self.tau)):
            if self.skips(layer):
                skipped += 1
            else:
                self.ran(layer, cos_by_layer[:, layer])
        return skipped


class AdaptiveReference:
    """FFN-SkipLLM for bs 1, one token per decode forward, driven by `AdaptiveRule` with plain hooks; or for a batch
    deciding together (batch_decision="shared", every decode row real): a run starts when every row passes.

    h is read as the input of the pre-FFN norm, h + c as the layer output; a skipped FFN's output is replaced by zeros
    by a forward hook (exact, saves nothing).
    """

    def __init__(self, model, plan: SkipPlan):
        self.plan, self.arch = plan, resolve(model)
        self.rule = AdaptiveRule.of(plan, self.arch.num_layers)
        self.hooks, self.h, self.skipping = [], {}, False
        self.prompt, self.decode, self.skipped = None, None, 0
        self.hooks.append(model.register_forward_pre_hook(self._start, with_kwargs=True))
        for site in self.arch.sites:
            l = site.index
            self.hooks.append(site.layer.post_attention_layernorm.register_forward_pre_hook(self._read_h(l)))
            self.hooks.append(site.ffn.register_forward_hook(self._ffn(l)))
            self.hooks.append(site.layer.register_forward_hook(self._layer(l)))

    def _start(self, module, args, kwargs):
        cache = cache_in(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            self.prompt = kwargs["input_ids"].shape[1]
        d = past - self.prompt
        self.decode = d if past > 0 and self.plan.eligible(d) else None
        self.rule.start_token()

    def _read_h(self, l):
        def hook(module, args):
            self.h[l] = args[0].detach().clone()
        return hook

    def _ffn(self, l):
        def hook(module, args, out):
            self.skipping = self.decode is not None and self.rule.skips(l)
            if self.skipping:
                self.skipped += out.shape[0]
                return torch.zeros_like(out)
            return None
        return hook

    def _layer(self, l):
        def hook(module, args, out):
            if self.decode is not None and not self.skipping:
                stream = out[0] if isinstance(out, tuple) else out
                self.rule.ran(l, torch.nn.functional.cosine_similarity(self.h[l].float(), stream.float(), dim=-1))
        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


class AdaptiveZeroedReference:
    """FFN-SkipLLM for bs 1, one token per forward, driven by `AdaptiveRule` with parts the runtime does not use: cos
    from the profiler's capture hooks (capture.py), skipping by zeroing the FFN's output weights for that layer's call.
    The driver sets `d`, the decode index of the next forward (None: the prompt)."""

    def __init__(self, model, plan: SkipPlan):
        self.model, self.plan = model, plan
        self.L = resolve(model).num_layers
        self.rule = AdaptiveRule.of(plan, self.L)
        self.dense = {l: [p.detach().clone() for p in output_weights(model, l)] for l in range(self.L)}
        self.d, self.zeroed, self.skipped = None, None, 0
        self.hooks = [model.register_forward_pre_hook(self._start)]
        self.hooks += [site.layer.register_forward_pre_hook(self._layer_start(site.index))
                       for site in resolve(model).sites]
        self.capture = FFNCapture(model, self._layer_done)

    def _deciding(self) -> bool:
        return self.d is not None and self.plan.eligible(self.d)

    def _start(self, module, args):
        self.rule.start_token()

    def _set(self, layer, zero):
        with torch.no_grad():
            for p, dense in zip(output_weights(self.model, layer), self.dense[layer]):
                p.copy_(torch.zeros_like(dense) if zero else dense)

    def _layer_start(self, layer):
        def hook(module, args):
            if self._deciding() and self.rule.skips(layer):
                self.skipped += 1
                self._set(layer, True)
                self.zeroed = layer
        return hook

    def _layer_done(self, t):
        if self.zeroed == t.index:
            self._set(t.index, False)
            self.zeroed = None
        elif self._deciding():
            self.rule.ran(t.index, torch.nn.functional.cosine_similarity(t.stream_in_ffn.float(), t.stream_out.float(),
                                                                         dim=-1))

    def remove(self):
        self.capture.remove()
        for h in self.hooks:
            h.remove()


def static_cache_decode(model, forward, ids, steps: int, max_cache_len: int = 16):
    """Greedy decoding through `forward` (the model, or a compiled model) on a StaticCache: (tokens [B, steps],
    logits [steps, B, V] of each step after the prompt)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    tokens, logits = [], []
    with torch.no_grad():
        out = forward(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
        for _ in range(steps):
            tokens.append(out.logits[:, -1:].argmax(-1))
            out = forward(input_ids=tokens[-1], **cache_kwargs(model, cache), use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.cat(tokens, 1), torch.stack(logits)

