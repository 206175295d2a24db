"""Errors that a retry would only repeat. Ray Train does not restart a worker group for them
(pipeline/train/ray_hooks.py) and the jobs exit with the documented status and the error's own message."""
from __future__ import annotations

from ldm.config import ConfigError


class UserError(Exception):
    """A problem with the user's config, data or checkpoint: fix the input, then rerun."""


class DataError(UserError, ValueError):
    """The data cannot train this config (too few rows for the batch, NaN/Inf everywhere, ...)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is corrupt, incomplete, or carries code (a pickle that is not plain weights)."""


class NonFiniteLoss(UserError, RuntimeError):
    """Too many non-finite losses in a row: the last good checkpoint is kept."""


REPEATING = (UserError, ConfigError)


def base_error(e: BaseException) -> BaseException:
    """The exception a Ray Train worker raised, out of Ray's wrappers (UserExceptionWithTraceback, RayTaskError)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "_base_exc", None) or getattr(e, "cause", None)
        if not isinstance(inner, BaseException):
            break
        e = inner
    return e


def repeating_error(error: BaseException) -> BaseException | None:
    """The first worker error of a Ray Train failure that will repeat on retry, if any."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        e = base_error(failures[rank])
        if isinstance(e, REPEATING):
            return e
    e = base_error(error)
    return e if isinstance(e, REPEATING) else None
