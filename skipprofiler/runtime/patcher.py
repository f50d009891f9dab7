"""Reversible changes to a model: hooks, instance attributes (``forward``, ``extra_repr``), in-place permutations
(`on_undo`), all undone in reverse."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn


class Patcher:
    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def hook(self, removable: Any) -> None:
        """Keep a hook handle (from ``register_forward_hook`` and friends) for undo."""
        self._undo.append(removable.remove)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set an instance attribute; undo restores the previous instance value or removes it."""
        had, old = name in obj.__dict__, obj.__dict__.get(name)

        def undo() -> None:
            if had:
                obj.__dict__[name] = old
            else:
                obj.__dict__.pop(name, None)

        object.__setattr__(obj, name, value)
        self._undo.append(undo)

    def on_undo(self, undo: Callable[[], None]) -> None:
        """Run `undo` when everything is undone (after the changes made later)."""
        self._undo.append(undo)

    def describe(self, module: nn.Module, text: str) -> None:
        """Append `text` to what ``print(model)`` shows for `module`."""
        base = type(module).extra_repr(module)
        self.set_attr(module, "extra_repr", lambda: f"{base}, {text}" if base else text)

    def undo_all(self) -> None:
        while self._undo:
            self._undo.pop()()
