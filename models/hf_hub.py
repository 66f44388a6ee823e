"""Hugging Face model ids resolved offline, in the local hub cache.

``hf:ORG/NAME`` (or ``hf:ORG/NAME@REVISION``) names the snapshot folder that
``huggingface_hub`` (``from_pretrained``, ``huggingface-cli download``) left on disk:
``<cache>/models--ORG--NAME/snapshots/<commit>/``, where ``refs/<revision>`` (default ``main``)
holds the commit. The cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``. Nothing is downloaded: a missing id is an error saying where it
was looked for and how to fetch it. No torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from models.weights import WeightsError

PREFIX = "hf:"


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def is_hub_id(value: str | Path | None) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def resolve_hub_id(spec: str) -> Path:
    """The local snapshot folder of ``hf:ORG/NAME[@REVISION]``; ``WeightsError`` when absent."""
    repo, _, revision = spec[len(PREFIX):].partition("@")
    revision = revision or "main"
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise WeightsError(f"'{spec}' is not a Hugging Face model id: write hf:ORG/NAME, e.g. "
                           "hf:Salesforce/blip-itm-large-coco (optionally @REVISION)")
    cache = hub_cache()
    folder = cache / f"models--{repo.replace('/', '--')}"
    fetch = (f"fetch it on a machine with network access (huggingface-cli download {repo}) and copy the cache, "
             "or point HF_HUB_CACHE / HF_HOME at a cache that holds it")
    if not folder.is_dir():
        raise WeightsError(f"{spec}: not in the Hugging Face cache (looked for {folder}; the cache is $HF_HUB_CACHE, "
                           f"else $HF_HOME/hub, else ~/.cache/huggingface/hub); {fetch}")
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / commit
    if not snapshot.is_dir():
        have = sorted(p.name for p in (folder / "snapshots").glob("*")) if (folder / "snapshots").is_dir() else []
        raise WeightsError(f"{spec}: revision '{revision}' is not in {folder} (snapshots: "
                           f"{', '.join(have) or 'none'}); name one with @REVISION, or {fetch}")
    return snapshot


def local_path(value: str | Path) -> Path:
    """A checkpoint given as a path, or as ``hf:ORG/NAME`` (resolved in the local cache)."""
    return resolve_hub_id(value) if is_hub_id(value) else Path(value)
