"""The plug-in base: a feature installed on a handle (adaptive plans, prompt routing) that the handle calls around
each top-level forward. Imported by the plug-ins only: a static plan loads none of this."""

from __future__ import annotations


class Plugin:
    passive = False  # True while the plug-in runs a forward of its own: the handle leaves that forward alone

    def before(self, module, args: tuple, kwargs: dict, *, ref, mask, past: int, prompt_end: list[int],
               teacher_forced: bool) -> None:
        """Before the forward is planned (routing sets ``handle.row_classes`` here). ref: the input ids or embeddings
        [B, S, ...]; mask: the 2-D attention mask (None: every position is real); past: positions already cached;
        prompt_end: per row, where decode positions start; teacher_forced: inside ``decode_from``."""

    def begin(self, forward) -> None:
        """After it is planned (adaptive plans set ``forward.dynamic``)."""

    def end(self, forward) -> None:
        """After it ran, before its counts are added."""
