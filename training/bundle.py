"""``runtime train bundle``: ship a finished training run as a ``shapes`` preset file.

Copies the run's weights into ``models/assets/shapes/`` under the preset's file name (float32
tensors stored as float16: half the size, and the loaders cast them back; the quick check below
runs on the shipped file) and writes ``<name>.manifest.json`` beside it: the file's sha256 and
size, the exact training command (and every invocation of a resumed run; ``earlier_stages``: the
runs whose weights it started from, ``--init`` / ``--vision-from``, found by the ``config.json``
beside those files), seeds, steps, training time, device and threads, the data the model was
trained and evaluated on, the run's held-out metrics, and the quick check's metrics (the model's
``check_metrics`` on a small held-out set, seed 7000, never used in training), which
``tests/test_shapes_weights.py`` recomputes from the shipped file.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from plugins import Registry

CHECK_SEED = 7000  # shapes seed of the quick checks; training uses 0, the runs' held-out sets 1000


def quick_check(module: str) -> Callable[[Path], dict[str, float]]:
    """The quick check of a weights file written by the trainer in ``module``: its
    ``check_metrics(path, seed=CHECK_SEED)`` (the module is imported when the check runs)."""
    def check(path: Path) -> dict[str, float]:
        return importlib.import_module(module).check_metrics(path, seed=CHECK_SEED)

    return check


@dataclass(frozen=True)
class Shipped:
    """A shipped ``shapes`` preset file (``models/assets/shapes/<name>.safetensors``): the weights
    file its training run writes and how the shipped copy is checked."""

    name: str
    run_file: str                                   # the weights file a training run writes
    check: Callable[[Path], dict[str, float]]


# the shipped presets; other packages add theirs through the ``pnpvqa.shipped`` entry points
SHIPPED: Registry[Shipped] = Registry("shipped preset", "pnpvqa.shipped", lambda s: s.name)
for _shipped in (
    Shipped("blip_itm", "itm.safetensors", quick_check("training.itm")),
    Shipped("blip_caption", "caption.safetensors", quick_check("training.caption_eval")),
    Shipped("efficient_sam", "efficient_sam.safetensors", quick_check("training.sam_eval")),
    Shipped("fid_t5", "fid_t5.safetensors", quick_check("training.fid")),
    Shipped("qavit", "qavit.safetensors", quick_check("training.qavit_eval")),
    Shipped("fusion_concat_conv", "fusion.safetensors", quick_check("training.fusion_eval")),
    Shipped("fusion_cross_attention", "fusion.safetensors", quick_check("training.fusion_eval")),
    Shipped("fusion_difnet", "fusion.safetensors", quick_check("training.fusion_eval")),
):
    SHIPPED.add(_shipped, "training/bundle.py")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_half(source: Path, target: Path) -> None:
    """Copy a safetensors file with its float32 tensors as float16 (metadata kept), atomically."""
    import torch
    from safetensors import safe_open

    from models.weights import save_safetensors

    with safe_open(str(source), framework="pt") as fh:
        metadata = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    save_safetensors({k: (v.to(torch.float16) if v.dtype == torch.float32 else v).contiguous()
                      for k, v in tensors.items()}, target, metadata)


def manifest_path(weights: Path) -> Path:
    return weights.with_name(weights.name.removesuffix(".safetensors") + ".manifest.json")


def earlier_stages(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs ``config``'s run started from (its ``--init`` / ``--vision-from`` files), earliest
    first: each file's command, invocations, steps and time from the ``config.json`` beside it,
    or only the file when there is none (a copied file)."""
    stages: list[dict[str, Any]] = []
    for option in ("init", "vision_from"):
        weights = (config.get("training") or {}).get(option)
        if not weights:
            continue
        stage: dict[str, Any] = {"option": "--" + option.replace("_", "-"), "weights": weights}
        earlier = Path(weights).parent / "config.json"
        if earlier.is_file() and earlier.resolve() != Path(weights).resolve():
            before = json.loads(earlier.read_text())
            stages += earlier_stages(before)
            stage.update({k: before.get(k) for k in ("command", "invocations", "steps_done", "train_seconds")})
        else:
            stage["run"] = "unknown: no config.json beside the file"
        stages.append(stage)
    return stages


def bundle(run_dir: Path, name: str, dest: Path, allow_unfinished: bool = False) -> dict[str, Any]:
    """Copy ``run_dir``'s weights to ``dest/<name>.safetensors``, check them and write the manifest."""
    if name not in SHIPPED:
        raise ValueError(f"unknown shipped model {name!r}; choose one of {', '.join(SHIPPED)}")
    shipped = SHIPPED[name]
    source = run_dir / shipped.run_file
    config_file, metrics_file = run_dir / "config.json", run_dir / "metrics.json"
    for path in (source, config_file, metrics_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: is {run_dir} the --out folder of a finished "
                                    f"training that writes {shipped.run_file}?")
    config = json.loads(config_file.read_text())
    metrics = json.loads(metrics_file.read_text())
    if not config.get("finished") and not allow_unfinished:
        raise ValueError(f"{run_dir} is not finished (steps done: {config.get('steps_done')}); finish it with "
                         "--resume, or pass --allow-unfinished")
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{name}.safetensors"
    write_half(source, target)
    held_out = {k: v for k, v in (metrics.get("eval") or {}).items() if k != "examples"}
    manifest = {
        "file": target.name,
        "sha256": sha256_file(target),
        "bytes": target.stat().st_size,
        "command": config.get("command"),
        "invocations": config.get("invocations"),
        "earlier_stages": earlier_stages(config),
        "seeds": config.get("seeds"),
        "steps": config.get("steps_done"),
        "train_seconds": config.get("train_seconds"),
        "device": config.get("device"),
        "torch_threads": config.get("torch_threads"),
        "model": config.get("model"),
        "source": config.get("source"),
        "eval_source": config.get("eval_source"),
        "held_out_metrics": held_out,
        "storage": "float16 (trained in float32; held_out_metrics are the float32 run's, check metrics the shipped "
                   "file's)",
        "check": {"seed": CHECK_SEED, "metrics": shipped.check(target),
                  "note": "recomputed by tests/test_shapes_weights.py; must agree within 0.02"},
        "bundled": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifest_path(target).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def parser() -> argparse.ArgumentParser:
    from models.weights import SHAPES_WEIGHTS_DIR

    p = argparse.ArgumentParser(
        prog="runtime train bundle",
        description="Ship a finished training run as a shapes preset file: copy its weights to "
                    "DEST/NAME.safetensors, run the model's quick held-out check, write NAME.manifest.json.")
    p.add_argument("run", metavar="RUN_DIR", help="the --out folder of a finished `runtime train ...` run")
    p.add_argument("--as", dest="name", required=True, choices=sorted(SHIPPED), help="the shipped model")
    p.add_argument("--dest", default=str(SHAPES_WEIGHTS_DIR), help="folder of the shapes preset files")
    p.add_argument("--allow-unfinished", action="store_true", help="ship a run that stopped before --steps")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``runtime train bundle``; returns the exit status."""
    from models.weights import WeightsError

    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        manifest = bundle(Path(args.run), args.name, Path(args.dest), args.allow_unfinished)
    except (ValueError, FileNotFoundError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"shipped {Path(args.dest) / manifest['file']} ({manifest['bytes'] / 1e6:.2f} MB, sha256 "
          f"{manifest['sha256'][:12]}...); check metrics: {json.dumps(manifest['check']['metrics'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
