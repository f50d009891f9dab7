"""Shared CLI helpers: model/tokenizer loading with one-line errors, --device/--dtype parsing, output checks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import CLIError
from .options import DTYPE_VALUES

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
          "fp16": "float16"}


def parse_dtype(name: str):
    import torch

    canonical = DTYPES.get(str(name).lower())
    if canonical is None:
        raise CLIError(f"unknown --dtype {name!r}; use {DTYPE_VALUES}")
    return getattr(torch, canonical)


def parse_batch_decisions(values: list[str] | None) -> list[str]:
    """--batch-decision values (repeatable), deduplicated, each per_sequence or shared."""
    from ..plan.model import BATCH_DECISIONS

    decisions = list(dict.fromkeys(values or []))
    bad = [d for d in decisions if d not in BATCH_DECISIONS]
    if bad:
        raise CLIError(f"unknown --batch-decision {bad[0]!r}; use {' or '.join(BATCH_DECISIONS)}")
    return decisions


def parse_device(name: str | None):
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def model_source(model_arg: str | None):
    """What to load (skipprofiler.arch.models.ModelSource): the bundled demo model when none is given, a checkpoint
    folder, a .gguf file or a hub id."""
    from ..arch.models import ModelSourceError, model_source as resolve_source

    try:
        return resolve_source(model_arg)
    except ModelSourceError as e:
        raise CLIError(str(e)) from None


def one_model(positional: str | None, option: str | None) -> str | None:
    """The model given either way: `--model` (the vocabulary, docs/cli.md) or the older positional MODEL."""
    if positional is not None and option is not None and positional != option:
        raise CLIError(f"two models given ({positional} and --model {option}); give one with --model")
    return option if option is not None else positional


def model_location(model_arg: str | None) -> str:
    """The model as a user would name it (the folder, the .gguf file or the hub id)."""
    return model_source(model_arg).display


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def load_model_and_tokenizer(model_arg: str | None, dtype: str = "float32", device: str | None = "cpu",
                             need_tokenizer: bool = True, device_map: str | dict | None = None,
                             offload_folder: Path | None = None, dist_ctx: Any = None) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer) through `models.load_model`. Every failure is a CLIError with one
    actionable line.

    With `device_map` (see distributed.parse_device_map) accelerate spreads the model over devices and `device`
    is not used."""
    import transformers

    from ..arch.models import load_config, load_model, load_tokenizer
    from ..arch.registry import UnsupportedArchitecture, resolve

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    source = model_source(model_arg)
    location = source.display
    torch_dtype = parse_dtype(dtype)
    target = parse_device(device)
    local = Path(source.location).is_dir()
    if isinstance(device_map, dict) and "disk" in device_map.values() and offload_folder is None:
        raise CLIError("--device-map puts modules on 'disk': give --offload-folder")
    try:
        config = load_config(source)
    except (OSError, ValueError) as e:
        if not local:
            raise CLIError(f"model not found: {location} is not a local folder and the hub cannot provide it "
                           f"({_first_line(e)})") from None
        raise CLIError(f"cannot read the config of {location}: {_first_line(e)}") from None
    try:
        if device_map is not None:
            from ..profile.distributed import rank_max_memory

            model = load_model(source, dtype=torch_dtype, device_map=device_map, offload_folder=offload_folder,
                               max_memory=rank_max_memory(device_map, dist_ctx))
        else:
            model = load_model(source, dtype=torch_dtype)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "does not recognize" in str(e):
            raise CLIError(f"{location} is not a causal LM (model_type {getattr(config, 'model_type', '?')!r}); "
                           "skipprof needs a decoder-only model loadable with AutoModelForCausalLM") from None
        raise CLIError(f"cannot load {location}: {_first_line(e)}") from None
    except (OSError, RuntimeError, KeyError) as e:
        raise CLIError(f"cannot load {location}: {_first_line(e)}") from None
    try:
        resolve(model)
    except UnsupportedArchitecture as e:
        raise CLIError(_first_line(e)) from None
    if device_map is None:
        model.to(target)
    tokenizer = None
    if need_tokenizer:
        try:
            tokenizer = load_tokenizer(source)
        except (OSError, ValueError, TypeError) as e:
            raise CLIError(f"no usable tokenizer in {location}: {_first_line(e)}") from None
    return model, tokenizer


def check_writable(out: Path) -> None:
    """Fail before any work when `out` cannot be written (missing folder, a directory, no permission)."""
    if out.is_dir():
        raise CLIError(f"cannot write {out}: it is a directory; give a file name")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise CLIError(f"cannot write {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise CLIError(f"cannot write {out}: permission denied")


def write_output(path: Path, text: str) -> None:
    """Write a result file atomically (skipprofiler.atomic) with one-line errors."""
    from ..atomic import write_text_atomic

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CLIError(f"cannot write {path}: folder {folder} does not exist")
    try:
        write_text_atomic(path, text)
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror or e}") from None


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def load_profile(path: Path, partial_note: str | None = None):
    """Read a profile file for a subcommand: one actionable line when it is missing, a folder or corrupt. A partial
    profile (an interrupted run) is accepted; with `partial_note` a warning says what the command does with it."""
    from ..profile import Profile, ProfileError

    if path.is_dir():
        raise CLIError(f"{path} is a folder; give a profile file (e.g. {path}/*.prof)")
    if not path.exists():
        raise CLIError(f"profile not found: {path} (create one with `skipprof profile --out {path}`)")
    try:
        profile = Profile.load(path)
    except ProfileError as e:
        raise CLIError(f"cannot read profile {path}: {e}") from None
    if partial_note and profile.header.get("partial"):
        print(f"warning: {path} is a partial profile (the profiling run stopped early); {partial_note}",
              file=sys.stderr)
    return profile
