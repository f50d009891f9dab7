"""Recording a profile: capture hooks on every FFN, a teacher-forced prompt pass and a greedy decode loop per batch,
binned on the model's device into the accumulators of `histograms`."""

from __future__ import annotations

import platform
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..arch.capture import (FFNCapture, LayerTensors, NoNeuronSite, down_projection, down_weight,
                            intermediate_size)
from .corpus import Batch
from ..arch.greedy import accepts, greedy_step
from .histograms import MetricAccumulator, PriorityReservoir, binning_spec, default_edges
from ..arch.registry import model_fingerprint, resolve
from ..arch.pooling import pool, prompt_weights
from .data import DEFAULT_DOC_RESERVOIR, DEFAULT_RESERVOIR, METRICS, REGIMES, Profile, ProfileError
from .fileformat import FORMAT, FORMAT_VERSION
from .merge import now, token_summary


# How document features for the prompt router are pooled (skipprofiler.plan.ROUTER_POOLINGS); recorded in the header.
ROUTER_POOLING = "mean_after_first"

@dataclass
class ProfileSettings:
    """Everything that shapes a profile besides the model (defaults: `skipprof profile`'s). `profile_model` reads the
    recording fields; `skipprofiler.profile_corpus` also reads the corpus fields to build the batches."""

    # corpus (skipprofiler.profile.corpus.Corpus)
    data: list[str] | None = None  # --data specs, [CLASS=]file|glob|folder|hub-name; None: bundled calibration split
    text_column: str | None = None  # default `text`, else chat `messages` rendered with the chat template
    class_column: str | None = None  # default `class` when present, else one class `default`
    max_tokens: int = 60_000  # prompt-token budget over the whole corpus
    seq_len: int = 256  # tokens per document (longer ones are truncated)
    batch_size: int = 8  # documents per forward (length-sorted batching)
    shard: tuple[int, int] | None = None  # (I, N): profile only batches j with j % N == I (array jobs)
    # recording
    generate: int = 0  # greedy tokens generated per prompt and profiled as the decode regime
    reservoir_size: int = DEFAULT_RESERVOIR  # per-token samples kept per class and regime (adaptive fits)
    doc_reservoir_size: int = DEFAULT_DOC_RESERVOIR  # per-document hidden-state samples per class (router)
    seed: int = 0
    router_layer: int | None = None  # default num_layers // 2
    # Per-neuron statistics of every FFN (sums of a and a^2 of the down projection's input a, sums of x^2 of the FFN
    # input x): None = record them where every FFN is dense (sparse-MoE models are profiled without, the header says
    # why); True = required (a sparse-MoE model is refused); False = not recorded.
    neurons: bool | None = None

    def problems(self) -> list[str]:
        """Every invalid setting, each as one line naming the field (`ProfileSettings.seq_len`); the CLI prints the
        options that set them instead."""
        out = [f"ProfileSettings.{name} must be > 0, got {value}" for name, value in
               (("max_tokens", self.max_tokens), ("seq_len", self.seq_len), ("batch_size", self.batch_size))
               if value <= 0]
        out += [f"ProfileSettings.{name} must be >= 0, got {value}" for name, value in
                (("generate", self.generate), ("reservoir_size", self.reservoir_size),
                 ("doc_reservoir_size", self.doc_reservoir_size)) if value < 0]
        if self.neurons not in (None, True, False):
            out.append(f"ProfileSettings.neurons must be None, True or False, got {self.neurons!r}")
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            out.append(f"ProfileSettings.shard (I, N) needs 0 <= I < N, got {self.shard[0]}/{self.shard[1]}")
        return out


@dataclass
class ProgressEvent:
    prompt_tokens: int
    decode_tokens: int
    batches: int


def _metrics_of(t: LayerTensors) -> torch.Tensor:
    """[4, B, S] float32: residual cos, ffn_io cos, norm_ratio, stream_gain (NaN where a norm is 0)."""
    out = t.stream_out.float()
    contribution = t.contribution.float()
    h = out - contribution
    norm_h, norm_out = torch.linalg.vector_norm(h, dim=-1), torch.linalg.vector_norm(out, dim=-1)
    residual = torch.linalg.vecdot(h, out) / (norm_h * norm_out)
    x, y = t.ffn_input.float(), t.ffn_output.float()
    ffn_io = torch.linalg.vecdot(x, y) / (torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(y, dim=-1))
    norm_ratio = torch.linalg.vector_norm(contribution, dim=-1) / norm_h
    return torch.stack([residual, ffn_io, norm_ratio, norm_out / norm_h])


def _neuron_rows(t: LayerTensors, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per batch row: sum of a, sum of a^2 ([B, I] float32), sum of x^2 ([B, H]) over the row's real tokens, and the
    tokens counted ([B] int64). A row whose sums are not finite (NaN/inf activations) is left out whole (a document
    in the prompt regime, one token in decode): no per-token finiteness pass over [B, S, I]."""
    m = mask.to(device=t.ffn_hidden.device, dtype=torch.float32)[..., None]  # [B, S, 1]
    am = t.ffn_hidden.to(torch.float32) * m  # a new tensor: the model's own is never written
    s1 = am.sum(1)
    s2 = am.square_().sum(1)
    xm = t.ffn_input.to(torch.float32) * m
    xs = xm.square_().sum(1)
    ok = torch.isfinite(s2).all(-1) & torch.isfinite(s1).all(-1) & torch.isfinite(xs).all(-1)  # [B]
    keep = ok[:, None]
    return (torch.where(keep, s1, 0.0), torch.where(keep, s2, 0.0), torch.where(keep, xs, 0.0),
            torch.where(ok, mask.to(ok.device).sum(1), 0))


class NeuronAccumulator:
    """Exact per-class sums of the FFN neuron statistics on one device: float64 [L, C, I] sums of a and a^2,
    [L, C, H] sums of x^2, int64 [L, C] token counts. Batches arrive as float32 per-row sums; rows are added into
    their class in float64 (a one-hot matmul: deterministic, no atomics)."""

    def __init__(self, num_layers: int, width: int, input_width: int, device: torch.device):
        self.device = torch.device(device)
        self.num_classes = 0
        zeros = lambda n, dtype=torch.float64: torch.zeros(num_layers, 0, *n, dtype=dtype, device=self.device)  # noqa
        self.sum, self.sq, self.input_sq = zeros((width,)), zeros((width,)), zeros((input_width,))
        self.count = zeros((), torch.int64)

    def ensure_classes(self, num_classes: int) -> None:
        extra = num_classes - self.num_classes
        if extra <= 0:
            return
        grow = lambda t: torch.cat([t, t.new_zeros(t.shape[0], extra, *t.shape[2:])], dim=1)  # noqa: E731
        self.sum, self.sq, self.input_sq, self.count = (grow(t) for t in (self.sum, self.sq, self.input_sq,
                                                                          self.count))
        self.num_classes = num_classes

    def add(self, rows: list[tuple[torch.Tensor, ...]], class_ids: torch.Tensor) -> None:
        """rows: per layer (sum a [B, I], sum a^2 [B, I], sum x^2 [B, H], count [B]); class_ids: [B]."""
        classes = class_ids.to(self.device)
        onehot = torch.nn.functional.one_hot(classes, self.num_classes).T.to(torch.float64)  # [C, B]
        stacked = [torch.stack([r[i].to(self.device) for r in rows]) for i in range(4)]  # [L, B, ...]
        self.sum += torch.matmul(onehot, stacked[0].double())
        self.sq += torch.matmul(onehot, stacked[1].double())
        self.input_sq += torch.matmul(onehot, stacked[2].double())
        self.count.index_add_(1, classes, stacked[3].to(torch.int64))

    def numpy(self) -> dict[str, np.ndarray]:
        return {"sum": self.sum.cpu().numpy(), "sq": self.sq.cpu().numpy(), "input_sq": self.input_sq.cpu().numpy(),
                "count": self.count.cpu().numpy()}


def neuron_sites(model: torch.nn.Module, resolved, required: bool) -> tuple[dict | None, str | None]:
    """(the header's `neurons` record, None) when every FFN has one down projection of one width; (None, why not)
    otherwise. `required`: raise ProfileError (one line) instead of returning the reason."""
    try:
        found = [down_projection(site) for site in resolved.sites]
        widths = sorted({intermediate_size(module) for _, module in found})
        if len(widths) != 1:
            raise NoNeuronSite(f"the FFNs have different widths ({', '.join(map(str, widths[:4]))}): per-neuron "
                               "statistics need one width across layers")
    except NoNeuronSite as e:
        why = f"{resolved.model_type}: {e}"
        if required:
            raise ProfileError(f"no neuron statistics for {why}") from None
        return None, why
    name = found[0][0] if resolved.sites[0].ffn is None else f"{resolved.spec.ffn}.{found[0][0]}"
    input_width = down_weight(found[0][1]).shape[0]  # the FFN reads and writes the hidden width
    return {"intermediate_size": widths[0], "input_size": int(input_width), "down_projection": name,
            "activation": "input of the down projection"}, None


class ProfileRecorder:
    """Turns captured layers into accumulator updates: hooks stash [4, B, S] per layer, `commit` bins them all."""

    def __init__(self, num_layers: int, device: torch.device, settings: ProfileSettings, num_classes: int = 0,
                 neurons: dict | None = None):
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.router_layer = settings.router_layer if settings.router_layer is not None else num_layers // 2
        self.edges = default_edges()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(settings.seed)
        self.stats = {regime: MetricAccumulator(self.edges, num_layers, num_classes, self.device)
                      for regime in REGIMES}
        self.samples = {regime: PriorityReservoir(settings.reservoir_size, num_classes,
                                                  {"cos": (num_layers,), "gain": (num_layers,)}, self.device,
                                                  generator) for regime in REGIMES}
        self.doc_reservoir_size = settings.doc_reservoir_size
        self.generator = generator
        self.docs: PriorityReservoir | None = None
        self._stash: list[torch.Tensor | None] = [None] * num_layers
        self._doc_mean: torch.Tensor | None = None
        self.pool_documents = False
        self.token_mask: torch.Tensor | None = None  # [B, S] bool, set before each forward
        self.neurons = neurons  # the header's `neurons` record; None: not recorded
        self.neuron_stats: dict[str, NeuronAccumulator] = {}
        self._neuron_stash: list[tuple[torch.Tensor, ...] | None] = [None] * num_layers
        if neurons is not None:
            self.neuron_stats = {regime: NeuronAccumulator(num_layers, neurons["intermediate_size"],
                                                           neurons["input_size"], self.device) for regime in REGIMES}

    def on_layer(self, t: LayerTensors) -> None:
        self._stash[t.index] = _metrics_of(t)  # computed on the layer's own device (device maps)
        if self.neurons is not None:
            self._neuron_stash[t.index] = _neuron_rows(t, self.token_mask)
        if self.pool_documents and t.index == self.router_layer:  # the document's prompt pass, from position 0
            weights = prompt_weights(self.token_mask.to(t.stream_out.device).float(), ROUTER_POOLING, True)
            self._doc_mean = pool(t.stream_out, weights).to(self.device)

    def ensure_classes(self, num_classes: int) -> None:
        for regime in REGIMES:
            self.stats[regime].ensure_classes(num_classes)
            self.samples[regime].ensure_classes(num_classes)
            if self.neuron_stats:
                self.neuron_stats[regime].ensure_classes(num_classes)
        if self.docs is not None:
            self.docs.ensure_classes(num_classes)

    def commit(self, regime: str, class_ids: torch.Tensor) -> int:
        """Bin the stashed forward; returns the number of real tokens counted."""
        stash, self._stash = self._stash, [None] * self.num_layers
        if any(s is None for s in stash):
            missing = [i for i, s in enumerate(stash) if s is None]
            raise RuntimeError(f"the capture hooks saw no FFN in layers {missing[:5]}: the model's forward "
                               "did not run them (is another skip plan applied?)")
        values = torch.stack([s.to(self.device) for s in stash])  # [L, 4, B, S]; 4 floats/token cross devices
        if self.neurons is not None:
            rows, self._neuron_stash = self._neuron_stash, [None] * self.num_layers
            if any(r is None for r in rows):
                raise RuntimeError("the capture hooks saw no FFN intermediate activation in layers "
                                   f"{[i for i, r in enumerate(rows) if r is None][:5]}")
            self.neuron_stats[regime].add(rows, class_ids)
        mask = self.token_mask
        token_classes = class_ids.to(self.device)[:, None].expand(mask.shape)[mask]
        picked = values[:, :, mask]  # [L, 4, N]
        per_metric = {m: picked[:, i] for i, m in enumerate(METRICS)}
        self.stats[regime].add(per_metric, token_classes)
        rows_cos, rows_gain = per_metric["residual"].T, per_metric["stream_gain"].T
        finite_rows = torch.isfinite(rows_cos).all(1) & torch.isfinite(rows_gain).all(1)
        self.samples[regime].add(token_classes[finite_rows], cos=rows_cos[finite_rows], gain=rows_gain[finite_rows])
        if self.pool_documents and self._doc_mean is not None:
            if self.docs is None:
                self.docs = PriorityReservoir(self.doc_reservoir_size, self.stats[regime].num_classes,
                                              {"f": (self._doc_mean.shape[-1],)}, self.device, self.generator)
            self.docs.add(class_ids.to(self.device), f=self._doc_mean)
            self._doc_mean = None
        return int(token_classes.numel())

    def to_profile(self, header: dict, classes: list[str]) -> Profile:
        C = len(classes)
        self.ensure_classes(C)
        parts = {regime: self.stats[regime].numpy() for regime in REGIMES}
        samples = {regime: self.samples[regime].numpy() for regime in REGIMES}

        def stack(get: Callable[[dict], np.ndarray]) -> np.ndarray:
            return np.stack([get(parts[regime]) for regime in REGIMES])

        if self.docs is not None:
            docs = self.docs.numpy()
            doc_features, doc_len, doc_keys = docs["f"], docs["len"], docs["keys"]
        else:
            doc_features = np.zeros((C, 0, 0), np.float32)
            doc_len, doc_keys = np.zeros(C, np.int64), np.zeros((C, 0))
        token_count = stack(lambda p: p["tokens"])
        neurons: dict[str, np.ndarray | None] = dict.fromkeys(("sum", "sq", "input_sq", "count"))
        if self.neurons is not None:
            parts_n = {regime: self.neuron_stats[regime].numpy() for regime in REGIMES}
            neurons = {k: np.stack([parts_n[r][k] for r in REGIMES]) for k in neurons}
            header = dict(header, neurons=dict(self.neurons))
        header = dict(header, tokens=token_summary(token_count, classes), binning=binning_spec(),
                      reservoir_size=self.samples["prompt"].capacity, doc_reservoir_size=self.doc_reservoir_size,
                      router_layer=self.router_layer, router_pooling=ROUTER_POOLING)
        return Profile(
            header=header, classes=list(classes), edges={m: self.edges[m].copy() for m in METRICS},
            hist={m: stack(lambda p: p["hist"][m]) for m in METRICS}, count=stack(lambda p: p["count"]),
            mean={m: stack(lambda p: p["mean"][m]) for m in METRICS},
            m2={m: stack(lambda p: p["m2"][m]) for m in METRICS},
            nonfinite={m: stack(lambda p: p["nonfinite"][m]) for m in METRICS},
            reservoir=np.stack([samples[r]["cos"] for r in REGIMES]),
            reservoir_gain=np.stack([samples[r]["gain"] for r in REGIMES]),
            reservoir_len=np.stack([samples[r]["len"] for r in REGIMES]),
            reservoir_keys=np.stack([samples[r]["keys"] for r in REGIMES]),
            router_layer=self.router_layer, doc_features=doc_features, doc_len=doc_len, doc_keys=doc_keys,
            token_count=token_count, neuron_sum=neurons["sum"], neuron_sq=neurons["sq"],
            neuron_count=neurons["count"], input_sq=neurons["input_sq"])


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current batch; a second one raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextmanager
def _graceful_sigint() -> Iterator[_StopFlag]:
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, flag)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the first parameter that holds weights (accelerate leaves offloaded ones on `meta`)."""
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def profile_model(model: torch.nn.Module, batches: Iterable[Batch], settings: ProfileSettings | None = None,
                  class_names: Callable[[], list[str]] | list[str] | None = None, header: dict | None = None,
                  on_batch: Callable[[ProgressEvent], None] | None = None, eos_token_ids: Sequence[int] = (),
                  pad_token_id: int = 0) -> Profile:
    """Profile `model` on `batches` (teacher-forced prompt regime, plus `settings.generate` greedy decode tokens per
    prompt). Ctrl-C stops after the current batch and returns a profile with header `partial: true`."""
    settings = settings or ProfileSettings()
    resolved = resolve(model)
    device = _model_device(model)
    neurons, no_neurons = (None, "not requested") if settings.neurons is False else \
        neuron_sites(model, resolved, required=settings.neurons is True)
    recorder = ProfileRecorder(resolved.num_layers, device, settings, neurons=neurons)
    forward_kwargs = {"use_cache": False}
    if accepts(model, "logits_to_keep"):
        forward_kwargs["logits_to_keep"] = 1  # the prompt pass needs no logits: skip most of the LM head
    pass_positions = accepts(model, "position_ids")
    progress = ProgressEvent(0, 0, 0)
    partial = False
    model_was_training = model.training
    model.eval()
    # A first Ctrl-C stops after the current batch (partial profile); a second one aborts and writes nothing.
    with FFNCapture(model, recorder.on_layer, resolved, neurons=neurons is not None) as capture, torch.inference_mode(), \
            _graceful_sigint() as stop:
        for batch in batches:
            recorder.ensure_classes(batch.num_classes)
            ids = batch.input_ids.to(device)
            mask = batch.attention_mask.to(device)
            recorder.token_mask = mask.bool()
            recorder.pool_documents = True
            model(input_ids=ids, attention_mask=mask, **forward_kwargs)
            progress.prompt_tokens += recorder.commit("prompt", batch.class_ids)
            recorder.pool_documents = False
            if settings.generate > 0:
                progress.decode_tokens += _profile_decode(model, capture, recorder, ids, mask, batch.class_ids,
                                                          settings.generate, eos_token_ids, pad_token_id,
                                                          pass_positions, stop)
            progress.batches += 1
            if on_batch is not None:
                on_batch(progress)
            if stop.requested:
                partial = True
                break
    if model_was_training:
        model.train()
    names = list(class_names() if callable(class_names) else (class_names or []))
    names += [f"class{i}" for i in range(len(names), recorder.stats["prompt"].num_classes)]
    full_header = _base_header(model, device, settings)
    full_header.update(header or {})
    full_header["partial"] = partial
    full_header["router_layer"] = recorder.router_layer
    if neurons is None:
        full_header["neurons_skipped"] = no_neurons
    return recorder.to_profile(full_header, names)


def _profile_decode(model: torch.nn.Module, capture: FFNCapture, recorder: ProfileRecorder, ids: torch.Tensor,
                    mask: torch.Tensor, class_ids: torch.Tensor, new_tokens: int, eos_token_ids: Sequence[int],
                    pad_token_id: int, pass_positions: bool, stop: _StopFlag) -> int:
    """Greedy decoding with the KV cache from left-padded prompts; only real generated tokens are recorded.

    Not `greedy.greedy_decode`: rows are padded, stop at EOS and are recorded step by step; only the step is shared."""
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions",
                                                                                      None)
    lengths = mask.sum(1)
    keep = int(lengths.max())
    if max_positions:
        keep = max(1, min(keep, int(max_positions) - new_tokens))
    ids, mask = _left_pad(ids, mask, keep, pad_token_id)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    eos = torch.tensor(list(eos_token_ids) or [-1], device=ids.device)
    capture.enabled = False  # the prompt was already profiled by the teacher-forced pass
    try:
        kwargs = {"position_ids": positions} if pass_positions else {}
        next_token, cache = greedy_step(model, ids, None, attention_mask=mask, **kwargs)
    finally:
        capture.enabled = True
    active = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    last_position = positions[:, -1]
    counted = 0
    for _ in range(new_tokens):
        active = active & ~torch.isin(next_token, eos)  # a row that produced EOS stops; EOS is not fed back
        if not bool(active.any()) or stop.requested:
            break
        step_mask = active.to(mask.dtype)[:, None]
        mask = torch.cat([mask, step_mask], dim=1)
        last_position = last_position + 1
        feed = torch.where(active, next_token, torch.full_like(next_token, pad_token_id))[:, None]
        recorder.token_mask = active[:, None]
        kwargs = {"position_ids": last_position[:, None]} if pass_positions else {}
        next_token, cache = greedy_step(model, feed, cache, attention_mask=mask, **kwargs)
        counted += recorder.commit("decode", class_ids)
    return counted


def _left_pad(ids: torch.Tensor, mask: torch.Tensor, keep: int, pad_token_id: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows -> left-padded rows of width `keep`, each holding its last `keep` real tokens."""
    B = ids.shape[0]
    out_ids = torch.full((B, keep), pad_token_id, dtype=ids.dtype, device=ids.device)
    out_mask = torch.zeros((B, keep), dtype=mask.dtype, device=mask.device)
    for row, n in enumerate(mask.sum(1).tolist()):
        n_keep = min(int(n), keep)
        if n_keep:
            out_ids[row, keep - n_keep:] = ids[row, int(n) - n_keep:int(n)]
            out_mask[row, keep - n_keep:] = 1
    return out_ids, out_mask


def _base_header(model: torch.nn.Module, device: torch.device, settings: ProfileSettings) -> dict:
    config = getattr(model, "config", None)
    dtype = next(model.parameters()).dtype if any(True for _ in model.parameters()) else torch.float32
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"name": str(getattr(config, "_name_or_path", "") or type(model).__name__),
                  "fingerprint": model_fingerprint(model),
                  "max_position_embeddings": getattr(config, "max_position_embeddings", None)
                  or getattr(config, "n_positions", None)},
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "corpus": [],
        "partial": False,
        "generate": int(settings.generate),
        "seed": int(settings.seed),
        "versions": package_versions(),
        "created": now(),
    }


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("skipprofiler", "torch", "transformers", "datasets", "numpy", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
