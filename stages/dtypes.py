"""The ``dtype`` param of model stages. Apart from ``stages.common``, which every stage imports:
this module reaches torch, and a module that imports torch puts torch's version in the cache key
of every stage that imports it."""

from __future__ import annotations

from typing import Literal

DType = Literal["float32", "bfloat16", "float16"]
DTYPE_DOC = ("floating-point type the model computes in (part of the cache key): float32, bfloat16 (GPUs since "
             "Ampere; CPUs with AVX-512 BF16 / AMX) or float16 (GPUs); outputs are float32 either way")


def torch_dtype(name: str):
    """The torch dtype named ``name`` (``float32`` / ``bfloat16`` / ``float16``)."""
    import torch

    return getattr(torch, name)
