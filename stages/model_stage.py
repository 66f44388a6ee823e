"""The base of stages that run one model of a family (``models.family``): the weights checks,
the weights fingerprint and the loading come from the family, from the node's ``preset`` and
``checkpoint`` params; a subclass keeps ``process`` and its own checks (``extra_problems``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from stages.base import Stage

if TYPE_CHECKING:
    from models.family import ModelFamily


class ModelStage(Stage):
    """A stage whose ``setup`` loads ``self.model`` (and ``self.report``, ``self.tokenizer``:
    what the loading did, the tokenizer the weights bring or None) from its family."""

    family: ClassVar[ModelFamily]

    def model_family(self) -> ModelFamily:
        """The family of this node's model (override where a param picks it)."""
        return self.family

    def model_config(self) -> Any:
        """The sizes of the model this node loads (the preset's, or an explicit checkpoint's own)."""
        return self.model_family().config(self.params.preset, self.params.checkpoint)

    def weights_options(self) -> dict[str, Any]:
        """Further params the family reads besides ``preset`` and ``checkpoint`` (e.g. a second
        weights source)."""
        return {}

    def extra_problems(self) -> list[tuple[str, str]]:
        """The stage's own checks of its params, reported before the weights problems."""
        return []

    def problems(self) -> list[tuple[str, str]]:
        p = self.params
        return self.extra_problems() + self.model_family().problems(p.preset, p.checkpoint, **self.weights_options())

    def weights_fingerprint(self) -> str | None:
        p = self.params
        return self.model_family().fingerprint(p.preset, p.checkpoint, **self.weights_options())

    def trained_on(self) -> str | None:
        return self.model_family().trained_on(self.params.preset, self.params.checkpoint)

    def setup(self, device: str) -> None:
        super().setup(device)
        p = self.params
        loaded = self.model_family().load(p.preset, p.checkpoint, device, **self.weights_options())
        self.model, self.report, self.tokenizer = loaded.model, loaded.report, loaded.tokenizer
