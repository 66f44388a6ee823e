"""The options of a ``runtime train MODEL`` command: :class:`Options` adds them to the help's
groups with their defaults read from the settings dataclass (one place per default), and
:class:`HelpFormatter` shows those defaults (:meth:`training.loop.Trainer.parser`)."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any


class Options:
    """Adds a command's options to the help's groups, defaults read from its settings dataclass."""

    def __init__(self, parser: argparse.ArgumentParser, settings: type, data_title: str) -> None:
        self.defaults = {f.name: (f.default_factory() if f.default is MISSING and f.default_factory is not MISSING
                                  else f.default) for f in fields(settings)}
        self.model = parser.add_argument_group("model")
        self.data = parser.add_argument_group(data_title)
        self.optimisation = parser.add_argument_group("optimisation")
        self.evaluation = parser.add_argument_group("held-out evaluation")

    def add(self, group: argparse._ArgumentGroup, flag: str, **kw: Any) -> None:
        """``group.add_argument(flag, ...)`` with the settings field's default unless ``default`` is given."""
        dest = kw.get("dest") or flag.lstrip("-").replace("-", "_")
        if "default" not in kw and kw.get("action") not in ("store_true", "append"):
            kw["default"] = self.defaults[dest]
        group.add_argument(flag, **kw)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not ``None`` (no default), nor on required options and flags."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.required or isinstance(action, argparse._StoreTrueAction):
            return action.help
        return super()._get_help_string(action)
