"""``models.weights.save_safetensors``: the weights files the project writes (training runs,
shipped presets, fusion modules) have the same bytes for the same content, so their sha256
fingerprints (cache keys, manifests) follow the content; they load back unchanged."""

from __future__ import annotations

import random

import torch
from safetensors import safe_open

from models.weights import safetensors_header, save_safetensors


def test_same_content_same_bytes_and_it_loads_back(tmp_path):
    tensors = {"w": torch.randn(3, 5), "half": torch.randn(7).half(), "ids": torch.arange(5), "b": torch.zeros(1)}
    metadata = {f"key{i}": f"value {i} \"quoted\" é" for i in range(12)}
    written = []
    for k in range(6):  # other insertion orders, other hash-map orders
        items = list(metadata.items())
        random.Random(k).shuffle(items)
        path = tmp_path / f"f{k}.safetensors"
        save_safetensors(tensors, path, dict(items))
        written.append(path.read_bytes())
    assert all(b == written[0] for b in written)
    assert len(written[0][8:8 + int.from_bytes(written[0][:8], "little")]) % 8 == 0  # data stays aligned
    with safe_open(str(tmp_path / "f0.safetensors"), "pt") as fh:
        assert fh.metadata() == metadata
        for name, value in tensors.items():
            loaded = fh.get_tensor(name)
            assert loaded.dtype == value.dtype and torch.equal(loaded, value)
    assert list(safetensors_header(tmp_path / "f0.safetensors")["__metadata__"]) == sorted(metadata)
    assert not list(tmp_path.glob(".*tmp*"))


def test_no_metadata(tmp_path):
    save_safetensors({"x": torch.ones(2)}, tmp_path / "x.safetensors")
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as fh:
        assert torch.equal(fh.get_tensor("x"), torch.ones(2))
