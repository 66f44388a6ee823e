"""``RunSettings``: how every process of a run behaves, built once at the edge and passed on.

The CLI builds it from its flags (``RunSettings.from_environment``), ``run_graphs`` from the
environment when a caller gives none; the executors, the shard work, the node runners and
each Ray worker (an argument of its actor) get it explicitly. Nothing below the edge reads
these settings from the environment.

Two of them stay environment variables at the model layer: ``models.weights`` reads the
weights folder (``PNPVQA_WEIGHTS``) and random weights (``PNPVQA_RANDOM_WEIGHTS``) wherever a
model looks for its checkpoint, deep inside model code that the runtime does not call with
arguments. ``apply_to_process`` sets both, in one place, in the driver and in every worker
before any model is built.

The S3 endpoint and region of the driver (``STORAGE_ENV``) go to every worker too: the store
and run folder already carry the driver's endpoint (pyarrow pickles it with the filesystem),
and images given as ``s3://`` URIs must be read from that same store, not from whatever a
node's environment names. Credentials are never passed on: the actor's arguments are kept in
Ray's GCS, readable by anyone who can reach the cluster, so each node brings its own (its
environment when ``ray start`` ran, ``~/.aws``, an instance role).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from models import weights as model_weights
from models.weights import RANDOM_WEIGHTS_ENV, WEIGHTS_ENV

DEBUG_ENV = "RUNTIME_DEBUG"                        # tracebacks without --debug (any command)
PROGRESS_SECONDS_ENV = "RUNTIME_PROGRESS_SECONDS"  # plain progress lines: seconds between them
DEFAULT_PROGRESS_SECONDS = 30.0
# which S3-compatible store, not who may use it (module doc): no credentials here
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


@dataclass(frozen=True)
class RunSettings:
    debug: bool = False              # --debug: tracebacks of failing rows
    profile: bool = False            # --profile: time inside model passes per node
    progress_seconds: float = DEFAULT_PROGRESS_SECONDS  # between plain progress lines (no terminal)
    weights: Path | None = None      # --weights: folder of real checkpoints
    random_weights: bool = False     # --random-weights: seeded random weights, for timing only
    storage_env: tuple[tuple[str, str], ...] = ()  # the driver's STORAGE_ENV variables that are set

    @classmethod
    def from_environment(cls, debug: bool = False, profile: bool = False, weights: Path | None = None,
                         random_weights: bool = False) -> "RunSettings":
        """The settings of this process: the flags given, else what its environment says."""
        return cls(debug=debug or bool(os.environ.get(DEBUG_ENV)), profile=profile,
                   progress_seconds=float(os.environ.get(PROGRESS_SECONDS_ENV, DEFAULT_PROGRESS_SECONDS)),
                   weights=weights or model_weights.weights_dir(),
                   random_weights=random_weights or model_weights.random_weights(),
                   storage_env=tuple((k, os.environ[k]) for k in STORAGE_ENV if os.environ.get(k)))

    def apply_to_process(self) -> None:
        """Set the model layer's two settings and the driver's storage endpoint and region in
        this process's environment (module doc)."""
        os.environ.update(self.storage_env)
        if self.weights is None:
            os.environ.pop(WEIGHTS_ENV, None)
        else:
            os.environ[WEIGHTS_ENV] = str(self.weights)
        if self.random_weights:
            os.environ[RANDOM_WEIGHTS_ENV] = "1"
        else:
            os.environ.pop(RANDOM_WEIGHTS_ENV, None)
