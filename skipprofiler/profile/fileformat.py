"""The profile file: named arrays in safetensors plus a JSON header in its metadata (docs/profile-format.md).

File input and output only: `skipprofiler.profile.data` turns a `Profile` into arrays and back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .._jsonable import jsonable
from ..atomic import atomic_path

FORMAT = "skipprof-profile"
FORMAT_VERSION = 2  # written; 2 added the optional per-neuron FFN statistics (neuron.* tensors)
READS_VERSIONS = (1, 2)  # version 1 files load as profiles without neuron statistics


class ProfileError(ValueError):
    """A profile cannot be read, merged or queried; the message is one line."""


def write_profile_file(path: str | os.PathLike, header: dict, tensors: dict[str, np.ndarray]) -> Path:
    """Write atomically (temp file in the same folder, then rename): a reader never sees half a profile."""
    from safetensors.numpy import save_file

    path = Path(path)
    header = dict(header, format=FORMAT, format_version=FORMAT_VERSION)
    metadata = {"skipprof": json.dumps(jsonable(header), sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_profile_file(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and arrays of a profile file; ProfileError when it is missing, damaged or not a profile."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"profile not found: {path}")
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ProfileError(f"{path} is truncated or not a skipprof profile (not a readable safetensors file: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    try:
        header = json.loads(metadata["skipprof"])
    except (KeyError, ValueError):
        raise ProfileError(f"{path} is a safetensors file without a skipprof profile header") from None
    if header.get("format") != FORMAT:
        raise ProfileError(f"{path} is not a skipprof profile (format {header.get('format')!r})")
    if header.get("format_version") not in READS_VERSIONS:
        raise ProfileError(f"{path} has profile format_version {header.get('format_version')!r}; this skipprof "
                           f"reads versions {', '.join(map(str, READS_VERSIONS))} (a newer skipprof wrote it?)")
    return header, tensors
