"""Local checkpoint files: where they are, safe loading, key reports, fingerprints.

No weights are ever downloaded. Real checkpoints live in a weights folder given by
``--weights DIR`` (which sets ``PNPVQA_WEIGHTS``) under standard file names; a missing file
is an error that names the file, where it was looked for and where it is published.
Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors, never unpickled
with code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from artifacts.filehash import file_sha256

if TYPE_CHECKING:  # torch is imported where tensors are read: finding files and fingerprints need none
    import torch
    from torch import nn

WEIGHTS_ENV = "PNPVQA_WEIGHTS"
# set by --random-weights: presets without an explicit checkpoint get seeded random weights at their
# real sizes (for timing the published architectures without the files); never for results
RANDOM_WEIGHTS_ENV = "PNPVQA_RANDOM_WEIGHTS"
# the ``shapes`` presets' weights, trained by the project and shipped with it (docs/quality.md)
SHAPES_WEIGHTS_DIR = Path(__file__).resolve().parent / "assets" / "shapes"


class WeightsError(Exception):
    """A checkpoint that is missing, unreadable, unsafe or does not fit the model."""


def random_weights() -> bool:
    """Whether this process runs every preset with seeded random weights (``--random-weights``)."""
    return os.environ.get(RANDOM_WEIGHTS_ENV) == "1"


def weights_dir() -> Path | None:
    value = os.environ.get(WEIGHTS_ENV)
    return Path(value) if value else None


def find_weights(file_name: str, published: str) -> Path:
    """The path of ``file_name`` in the weights folder, or a ``WeightsError`` saying how to get it."""
    root = weights_dir()
    if root is None:
        raise WeightsError(
            f"this preset needs the checkpoint '{file_name}', but no weights folder is set: pass "
            f"--weights DIR (or set {WEIGHTS_ENV}) with '{file_name}' in it. Published at: {published}")
    path = root / file_name
    if not path.exists():
        raise WeightsError(
            f"checkpoint '{file_name}' not found in the weights folder {root} (expected {path}). "
            f"Published at: {published}")
    return path


def shapes_weights(file_name: str, train_command: str) -> Path:
    """The bundled ``shapes`` preset file ``file_name``, or a ``WeightsError`` saying how to make it."""
    path = SHAPES_WEIGHTS_DIR / file_name
    if not path.exists():
        raise WeightsError(f"the shapes preset's weights {path} are missing (a partial checkout?). Restore them "
                           f"with git, or train them: {train_command}")
    return path


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` / ``.pt`` (``weights_only=True``) or ``.safetensors`` file; a state dict
    wrapped under ``"model"`` or ``"state_dict"`` is unwrapped."""
    import torch
    from safetensors import SafetensorError

    path = Path(path)
    if not path.exists():
        raise WeightsError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            check_safetensors(path)
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "")
        raise WeightsError(f"{path} holds objects other than tensors and is refused: checkpoints are read "
                           f"with weights_only=True (tensors and plain containers only). {detail}".strip()) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, SafetensorError) as exc:
        raise WeightsError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return dict(state)


@dataclass
class LoadReport:
    """What happened when a state dict was applied to a model."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # model keys the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)   # checkpoint keys the model lacks
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, checkpoint, model
    ignored: list[str] = field(default_factory=list)      # checkpoint keys dropped on purpose

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} loaded"]
        for name in ("missing", "unexpected", "mismatched", "ignored"):
            items = getattr(self, name)
            if items:
                shown = ", ".join(str(x if isinstance(x, str) else f"{x[0]} {tuple(x[1])} vs model {tuple(x[2])}")
                                  for x in items[:5])
                parts.append(f"{len(items)} {name} ({shown}{', ...' if len(items) > 5 else ''})")
        return "; ".join(parts)


def apply_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                     ignore: Iterable[str] = (), optional: Iterable[str] = ()) -> LoadReport:
    """Copy ``state`` into ``model`` and report; a missing or mismatched model key is an error.

    ``ignore``: prefixes of checkpoint keys not used by this model (momentum encoders, queues).
    ``optional``: model keys that may be absent from a checkpoint (buffers such as position_ids).
    """
    import torch

    ignore, optional = tuple(ignore), set(optional)
    report = LoadReport()
    own = model.state_dict()
    usable = {}
    for key, value in state.items():
        if ignore and key.startswith(ignore):
            report.ignored.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            usable[key] = value
    report.missing = [k for k in own if k not in state and k not in optional]
    if report.missing or report.mismatched:
        raise WeightsError(f"{source} does not fit the model: {report.summary()}. Is it the checkpoint of "
                           "another model or size (check --preset)?")
    broken = [k for k, v in usable.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise WeightsError(f"{source} holds NaN or infinite values in {len(broken)} tensors ({', '.join(broken[:5])}"
                           f"{', ...' if len(broken) > 5 else ''}): a diverged training run or a damaged file; "
                           "results from it would be meaningless")
    model.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    return report


def safetensors_header(path: str | Path) -> dict:
    """The JSON header of a ``.safetensors`` file (tensor names with dtype and shape, and
    ``__metadata__``), read without loading a tensor or importing torch. ``WeightsError`` when
    the file is not a safetensors file."""
    return _read_safetensors_header(path)[1]


def _read_safetensors_header(path: str | Path) -> tuple[int, dict]:
    """``(header size in bytes, header)`` of a ``.safetensors`` file."""
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 2 <= size <= 100 * 2**20:
                raise ValueError(f"header size {size}")
            header = json.loads(fh.read(size))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path} is not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a readable safetensors file (its header is not a JSON object)")
    return size, header


# bytes per element of the safetensors dtypes (sub-byte float types are not checked for size)
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2,
                           "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
                           "C64": 8}


def check_safetensors(path: str | Path) -> None:
    """``WeightsError`` naming ``path`` when its header does not describe its bytes: a tensor whose
    data_offsets do not fit its dtype and shape, or a file that is not exactly 8 + header + the
    end of the last tensor's data long (cut short by a download or a copy). Reads the header
    only: safetensors itself finds this when loading, without naming the file."""
    size, header = _read_safetensors_header(path)
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        problem = _tensor_entry_problem(info)
        if problem:
            raise WeightsError(f"{path} is damaged: tensor {name} {problem}; fetch or write it again")
        end = max(end, info["data_offsets"][1])
    data_bytes = Path(path).stat().st_size - 8 - size
    if data_bytes != end:
        raise WeightsError(f"{path} is damaged or cut short: it has {8 + size + data_bytes} bytes, its header describes "
                           f"{8 + size + end} (8 + header {size} + tensor data {end}); fetch or write it again")


def _tensor_entry_problem(info: object) -> str | None:
    """What is wrong with one tensor's header entry (its offsets against its dtype and shape)."""
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    shape = info.get("shape") if isinstance(info, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return f"has no valid data_offsets and shape ({info!r:.80})"
    begin, stop = offsets
    if not 0 <= begin <= stop:
        return f"has data_offsets {offsets}"
    itemsize = SAFETENSORS_DTYPE_BYTES.get(info.get("dtype"))
    if itemsize is not None and stop - begin != math.prod(shape) * itemsize:
        return f"({info.get('dtype')} {shape}) needs {math.prod(shape) * itemsize} bytes, its data_offsets give {stop - begin}"
    return None


def check_safetensors_files(paths: Iterable[Path]) -> None:
    """:func:`check_safetensors` for each ``.safetensors`` file of ``paths`` (others are read by
    torch, which names the file itself)."""
    for path in paths:
        if path.suffix == ".safetensors":
            check_safetensors(path)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Mapping[str, str] | None = None) -> None:
    """``tensors`` (contiguous, on the CPU) and ``metadata`` as a safetensors file, written
    beside ``path`` and renamed into place. The same input gives the same bytes, so a file's
    fingerprint follows its content: safetensors writes ``__metadata__`` in hash-map order (a
    new order in every process), so the header is written again with the metadata keys sorted."""
    from safetensors.torch import save

    data = save(dict(tensors), metadata=dict(metadata) if metadata else None)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # the tensor data stays 8-byte aligned
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little") + raw)
            fh.write(memoryview(data)[8 + size:])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_fingerprint(path: str | Path) -> str:
    """The sha256 of the whole file (32 hex digits), computed once per file version
    (``artifacts.filehash`` remembers it by path, size, mtime and inode)."""
    return file_sha256(path)[:32]


def tree_fingerprint(folder: str | Path, patterns: Iterable[str] = ("*",)) -> str:
    """Fingerprint of the files of a folder (e.g. a Hugging Face model directory)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            if path.is_file():
                h.update(path.name.encode())
                h.update(file_fingerprint(path).encode())
    return h.hexdigest()[:32]
