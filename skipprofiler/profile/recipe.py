"""The profile stage as one library call: `profile_corpus(model, tokenizer, ProfileSettings)` reads the corpus,
records a `Profile` on the model (sharded under torchrun) and completes its header (model naming, corpus provenance
and settings, elapsed time). `skipprof profile` parses its options into `ProfileSettings` and calls it; exported as
`skipprofiler.profile_corpus`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .._jsonable import rounded

DEMO_MODEL_NAME = "skipprofiler-demo"


def profile_corpus(model, tokenizer, settings=None, *, source: str | None = None, dist_ctx=None,
                   on_progress: Callable | None = None):
    """Profile FFN saturation of `model` on the corpus `settings` names (skipprofiler.profile.ProfileSettings;
    default: the bundled calibration split) and return the `Profile`, its header complete (model name and path,
    corpus provenance and settings, elapsed time).

    `source` is how the model was named when loaded (checkpoint folder, .gguf file or hub id; default: the config's
    `_name_or_path`); plans copy it. `on_progress(ProgressEvent)` is called after every batch. Under torchrun pass
    `dist_ctx` (skipprofiler.profile.distributed.init_from_env): ranks split the batches and rank 0 gets the merged profile,
    the other ranks None. A first Ctrl-C stops after the current batch: the profile comes back marked partial.
    """
    from .corpus import Corpus, parse_spec
    from .distributed import profile_distributed, shard_batches
    from . import ProfileError, ProfileSettings

    settings = settings or ProfileSettings()
    problems = settings.problems()
    if problems:
        raise ProfileError("; ".join(problems))
    if dist_ctx is not None and settings.shard is not None:
        raise ProfileError("under torchrun the ranks already split the corpus: leave ProfileSettings.shard unset")
    specs = list(settings.data or [_demo_corpus("calibration")])
    for spec in specs:
        parse_spec(spec)  # a missing data path fails before any work
    corpus = Corpus(specs, tokenizer, text_column=settings.text_column, class_column=settings.class_column,
                    max_tokens=settings.max_tokens, seq_len=settings.seq_len, batch_size=settings.batch_size).open()
    eos = getattr(tokenizer, "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    batches = corpus.batches()
    first = next(batches, None)  # an empty corpus fails here (CorpusError), before any progress output
    if first is None:
        raise ProfileError("the corpus gave no batch to profile")
    started = time.perf_counter()
    profile = profile_distributed(model, shard_batches(_chain(first, batches), settings.shard), dist_ctx, settings,
                                  class_names=lambda: corpus.classes, on_batch=on_progress, eos_token_ids=eos_ids,
                                  pad_token_id=corpus.pad_token_id)
    if profile is None:
        return None  # not rank 0: rank 0 holds the merged profile
    if profile.tokens("prompt") == 0:
        raise ProfileError("no tokens were profiled (interrupted before the first batch)")
    profile.header["model"].update(_model_naming(model, source))
    profile.header["corpus"] = corpus.provenance()
    profile.header["corpus_settings"] = corpus.settings()
    profile.header["elapsed_s"] = rounded(time.perf_counter() - started, 3, decimals=True)
    if settings.shard is not None:
        profile.header["shard"] = {"index": settings.shard[0], "count": settings.shard[1]}
    return profile


def _chain(first, rest):
    yield first
    yield from rest


def _demo_corpus(split: str) -> str:
    from .. import demo

    return demo.data_spec(split)


def _model_naming(model, source: str | None) -> dict[str, str]:
    """{name, path} for the profile header: a .gguf file is named by its file name (plans copy the name, and a
    site-packages path is this machine's only); the bundled demo model by DEMO_MODEL_NAME."""
    from ..arch.models import ModelSourceError, model_source

    given = source or str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    try:
        location = model_source(given).display
    except ModelSourceError:
        location = given
    if location.lower().endswith(".gguf"):
        return {"name": Path(location).name, "path": location}
    if _is_demo(location):
        return {"name": DEMO_MODEL_NAME, "path": location}
    return {"name": given, "path": location}


def _is_demo(location: str) -> bool:
    from .. import demo

    try:
        return Path(location).resolve() == Path(demo.model_path()).resolve()
    except (FileNotFoundError, OSError):
        return False
