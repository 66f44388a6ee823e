"""``runtime train bundle``'s record of a multi-stage recipe: the runs a shipped run started from."""

from __future__ import annotations

import json

import pytest

from training.bundle import earlier_stages

pytestmark = pytest.mark.slow


def _run(folder, command, training, steps=10):
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"x")
    config = {"command": command, "invocations": [{"command": command}], "steps_done": steps,
              "train_seconds": 1.5, "training": training}
    (folder / "config.json").write_text(json.dumps(config))
    return config


def test_earlier_stages_follow_init_and_vision_from_files_earliest_first(tmp_path):
    first = _run(tmp_path / "first", "train a", {"init": None})
    copied = tmp_path / "copied.safetensors"       # a file with no run folder beside it
    copied.write_bytes(b"y")
    second = _run(tmp_path / "second", "train b", {"init": str(tmp_path / "first" / "weights.safetensors")})
    third = {"training": {"init": str(tmp_path / "second" / "weights.safetensors"), "vision_from": str(copied)}}

    stages = earlier_stages(third)
    assert [s.get("command") for s in stages] == ["train a", "train b", None]
    assert [s["option"] for s in stages] == ["--init", "--init", "--vision-from"]
    assert stages[0]["invocations"] == first["invocations"] and stages[1]["steps_done"] == second["steps_done"]
    assert stages[2]["run"].startswith("unknown") and stages[2]["weights"] == str(copied)
    assert earlier_stages({"training": {"init": None}}) == [] and earlier_stages({}) == []
