"""Training commands (``runtime train ...``): models that have no published weights.

    fusion.py   ``runtime train fusion``: BLIP + SAM fusion modules on image-question matching
    itm.py      ``runtime train itm``: a BLIP ITM model (ITM on hard negatives + ITC)
    caption.py  ``runtime train caption``: the BLIP captioner on captions of sampled patches
    pairs.py    positive / hard-negative (image, question) pairs
    data.py     training samples from any dataset source; frozen-feature store
    outputs.py  checkpoint (atomic, weights_only), loss.csv, loss.png
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from plugins import Registry


@dataclass(frozen=True)
class Trainer:
    """A ``runtime train NAME`` command."""

    name: str
    description: str
    entry: str  # "module:function" of its main(argv); imported when the command runs (it pulls in its models)

    def main(self):
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(module), function)


# ``runtime train`` commands; other packages add theirs through the ``pnpvqa.trainers`` entry points
# (a Trainer object, named as the entry point)
TRAINERS: Registry[Trainer] = Registry("trainer", "pnpvqa.trainers", lambda t: t.name)
for _trainer in (
    Trainer("itm", "a BLIP ITM model (every parameter; ITM + ITC, optional grounding and patch-probe losses)",
            "training.itm:main"),
    Trainer("caption", "the BLIP captioner, on captions of the objects visible in sampled patches",
            "training.caption:main"),
    Trainer("sam", "EfficientSAM, on point prompts from object pixels", "training.sam:main"),
    Trainer("fid", "the UnifiedQA FiD T5, on question + captions -> answer", "training.fid:main"),
    Trainer("fusion", "a BLIP + SAM feature fusion module (frozen BLIP ITM and EfficientSAM)", "training.fusion:main"),
    Trainer("qavit", "QA-ViT (vision tower, instruction modules, question encoder)", "training.qavit:main"),
    Trainer("bundle", "ship a finished run as a shapes preset file with its manifest (models/assets/shapes)",
            "training.bundle:main"),
):
    TRAINERS.add(_trainer, "training/__init__.py")
