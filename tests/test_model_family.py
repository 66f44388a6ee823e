"""``models.family``: every model family's presets come from its one table, and the generic
find / fingerprint / problems path reads it (no torch needed)."""

from __future__ import annotations

import sys
import typing

import pytest

from models.blip.family import BLIP_CAPTION, BLIP_ITM
from models.efficient_sam import EFFICIENT_SAM
from models.family import ModelFamily, Preset, Published, RandomInit, Shipped
from models.fid_t5_family import FID_T5
from models.qavit.checkpoint import QAVIT
from models.weights import WEIGHTS_ENV, WeightsError
from stages.blip import BlipFeatures, Caption, ItmGradcam
from stages.qa import QAFiD
from stages.qavit import QAViTAttention
from stages.sam import SamEmbed, SamMask

FAMILIES = (BLIP_ITM, BLIP_CAPTION, EFFICIENT_SAM, FID_T5, QAVIT)


@pytest.mark.parametrize("stage", [ItmGradcam, Caption, BlipFeatures, SamEmbed, SamMask, QAFiD, QAViTAttention])
def test_stage_presets_are_the_family_table(stage):
    family = stage.family if hasattr(stage, "family") else BLIP_ITM
    assert typing.get_args(stage.Params.model_fields["preset"].annotation) == family.names


def test_published_presets_are_not_built_in_and_random_ones_need_no_file(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    for family in FAMILIES:
        assert family.built_in == ("tiny", "shapes")
        assert family.find("tiny") is None and len(family.fingerprint("tiny")) == 32
        for name in family.names:
            if name not in family.built_in:
                problems = family.problems(name)  # QA-ViT: its vision weights and its question encoder
                assert problems and all(field == "preset" and "Published at" in message for field, message in problems)


def test_table_entries_drive_lookup_messages_and_fingerprints(tmp_path, monkeypatch):
    config = EFFICIENT_SAM.config("tiny")
    family = ModelFamily("Toy", {"small": Preset(config, RandomInit(), "random"),
                                 "seeded": Preset(config, RandomInit(seed=1), "another seed"),
                                 "bundled": Preset(config, Shipped("toy.safetensors", "bin/train-toy"), "shipped"),
                                 "real": Preset(config, Published((("a.pt", "https://a"), ("b.pt", "https://b"))),
                                                "published")},
                         random_tag={"model": "toy"})
    assert family.random_fingerprint("small") != family.random_fingerprint("seeded")
    with pytest.raises(ValueError, match="unknown Toy preset 'huge'; choose one of small, seeded, bundled, real"):
        family.find("huge")
    with pytest.raises(WeightsError, match="toy.safetensors.*bin/train-toy"):
        family.find("bundled")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(WeightsError, match=r"'a\.pt' not found.*https://a.*also accepted: b\.pt"):
        family.find("real")
    (tmp_path / "b.pt").write_bytes(b"weights")
    assert family.find("real") == tmp_path / "b.pt"
    assert family.fingerprint("real") == family.fingerprint("small", tmp_path / "b.pt")
    assert family.problems("small", tmp_path / "missing.pt")[0][0] == "checkpoint"


def test_families_import_no_torch():
    import subprocess

    code = ("import sys; import models.blip.family, models.efficient_sam.checkpoint, models.fid_t5_family, "
            "models.qavit.checkpoint, stages.model_stage; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
