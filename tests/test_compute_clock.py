"""``runtime run --profile``: time inside model passes, counted once however deeply modules nest."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import GRAPHS, ROOT

pytestmark = pytest.mark.slow

CLOCK = """
import time, torch
from models import compute_clock

class Inner(torch.nn.Module):
    def forward(self, x):
        time.sleep(0.05)
        return x * 2

class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = Inner(), Inner()
    def forward(self, x):
        return self.b(self.a(x))

@compute_clock.counted
def decode(model, x):
    time.sleep(0.05)
    return model(x)

model, x = Outer(), torch.ones(2, requires_grad=True)
model(x)
off = compute_clock.seconds()
compute_clock.enable()
compute_clock.watch(model)
model(x)
forward = compute_clock.seconds()
decode(model, x)
loop = compute_clock.seconds() - forward
time.sleep(0.1)                      # outside any model: not counted
idle = compute_clock.seconds() - forward - loop
torch.autograd.grad(model(x).sum(), x)
print(off, forward, loop, idle)
"""


def test_clock_counts_watched_forward_once_decoding_loops_and_grad_only_when_enabled():
    out = subprocess.run([sys.executable, "-c", CLOCK], cwd=ROOT, capture_output=True, text=True, check=True)
    off, forward, loop, idle = map(float, out.stdout.split())
    assert off == 0.0
    assert 0.1 <= forward < 0.2          # two nested 50 ms modules inside one outer call: 100 ms, not 200
    assert 0.15 <= loop < 0.3            # the loop's own 50 ms + the model's 100 ms, counted once
    assert idle == 0.0


def test_profiled_run_records_model_seconds_per_node(tmp_path):
    graph = GRAPHS / "pnp_vqa.yaml"
    cmd = [sys.executable, "-m", "runtime", "run", str(graph), "--preset", "tiny", "--executor", "local", "--quiet",
           "--device", "cpu", "--set", "dataset.num_images=1", "--set", "dataset.questions_per_image=2",
           "--set", "caption.num_captions=1", "--set", "caption.max_rounds=1", "--profile",
           "--output", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    nodes = json.loads((tmp_path / "run" / "manifest.json").read_text())["nodes"]
    for name in ("gradcam", "caption", "answer"):
        assert 0 < nodes[name]["model_seconds"] <= nodes[name]["seconds"]
    for name in ("image", "pixels", "accuracy"):
        assert nodes[name]["model_seconds"] == 0
    assert "inside model forward / backward passes" in out
