"""The errors a user can act on, in one small module every layer may import.

``mlc_ray.cli.run_job`` turns these into one ``error: ...`` line and an exit code; nothing here
imports anything from mlc_ray, so ``storage`` (the lowest layer) can raise a ``UserError``
without knowing the CLI exists. The modules that own a contract re-export their error
(``mlc_ray.config.ConfigError``, ``mlc_ray.data.manifest.ManifestError``,
``mlc_ray.export.ExportError``), so callers import it from where the contract lives.
"""

from __future__ import annotations

__all__ = [
    "EXIT_USER_ERROR",
    "ConfigError",
    "ExportError",
    "JobError",
    "ManifestError",
    "UserError",
    "USER_ERROR_TYPES",
]

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Something the user can fix (wrong URI, missing bucket, unknown alias, ...). Message is shown as is."""

    exit_code = EXIT_USER_ERROR


class JobError(UserError):
    """A job-level failure with its own exit code (e.g. error rate above --max-error-rate)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(ValueError):
    """A configuration the user can fix: unknown key, wrong type, out-of-range value."""


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, the row and the fix."""


class ExportError(RuntimeError):
    """An export step failed (converter error, parity failure); the message says which and why."""


# What a job reports as one line instead of a traceback (see mlc_ray.cli.run_job).
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (
    UserError,
    ConfigError,
    ManifestError,
    FileNotFoundError,
    PermissionError,
)
