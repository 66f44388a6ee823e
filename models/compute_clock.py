"""Wall time spent inside model computations, for ``runtime run --profile``.

Counted while a watched module's ``forward`` (a stage's model and its direct children),
``torch.autograd.grad`` (GradCAM's backward) or a decoding loop marked ``@counted`` (sampling,
beam search, FiD generate: their token choice runs outside any module) is running in this
process; nested calls count once. Off unless ``enable`` is called. Hooks sit on the watched
modules only: global module hooks would push every module call of the run off torch's fast
path and slow the very thing measured.
"""

from __future__ import annotations

import functools
import sys
import time

_depth = 0
_entered = 0.0
_total = 0.0
_enabled = False


def _enter() -> None:
    global _depth, _entered
    if _depth == 0:
        _entered = time.perf_counter()
    _depth += 1


def _leave() -> None:
    global _depth, _total
    _depth -= 1
    if _depth == 0:
        _total += time.perf_counter() - _entered


def counted(fn):
    """Count the time inside ``fn`` (a decoding loop) when the clock is on."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _enabled:
            return fn(*args, **kwargs)
        _enter()
        try:
            return fn(*args, **kwargs)
        finally:
            _leave()

    return wrapper


def enable() -> None:
    """Start counting in this process (torch must be imported: a model was set up)."""
    global _enabled
    if _enabled or "torch" not in sys.modules:
        return
    import torch  # waits for an import still running on another thread

    torch.autograd.grad = counted(torch.autograd.grad)
    _enabled = True


def watch(module) -> None:
    """Count the forward passes of ``module`` and of its direct children (once per module)."""
    if getattr(module, "_compute_clock_watched", False):
        return
    for m in (module, *module.children()):
        if not getattr(m, "_compute_clock_watched", False):
            m.register_forward_pre_hook(lambda mod, args: _enter())
            m.register_forward_hook(lambda mod, args, out: _leave(), always_call=True)
            m._compute_clock_watched = True


def seconds() -> float:
    """Seconds counted so far in this process (0 while the clock is off)."""
    return _total
