"""What a runtime plug-in (adaptive plans, prompt routing) sees and may do: the handle calls every installed
plug-in around each top-level forward; a plug-in that decides layers while the forward runs sets `Forward.dynamic`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..arch.registry import ResolvedArch
from .patcher import Patcher
from .schedule import Forward, ForwardSource


@dataclass
class ForwardCall:
    """What the handle knows of a top-level forward before it runs."""

    module: Any
    args: tuple
    kwargs: dict
    mask: torch.Tensor | None  # the 2-D attention mask, when the call has one
    batch: int
    seq: int
    device: torch.device
    past: int  # positions already in the cache
    prompt_end: list[int]  # per row, where decode positions start
    teacher_forced: bool  # inside decode_from


class Host(ForwardSource, Protocol):
    """What a plug-in sees of the handle it installs itself on."""

    arch: ResolvedArch
    patcher: Patcher
    row_classes: list[str | None] | None  # per row of the last prompt: the class the router chose


class Plugin:
    """A feature that installs itself on a handle (adaptive plans, prompt routing) and runs around each forward."""

    passive = False  # True while the plug-in runs a forward of its own: the handle leaves that forward alone

    def before(self, call: ForwardCall) -> None:
        """Before the forward is planned (routing chooses each row's plan here)."""

    def begin(self, forward: Forward) -> None:
        """After it is planned (adaptive plans set `forward.dynamic`)."""

    def end(self, forward: Forward) -> None:
        """After it ran, before its counts are added."""
