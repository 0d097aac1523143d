"""User-facing errors: the CLI prints these as one line and exits with code 2, without a traceback."""

from __future__ import annotations


class PreftuneError(Exception):
    """A mistake in the user's input (file, config, flag, model folder). The message says what, where and the fix."""

    exit_code = 2


class ConfigError(PreftuneError):
    """A config key or value is wrong."""


class DataError(PreftuneError):
    """A data file or record is wrong. Messages name the file and the line or record."""


class ModelError(PreftuneError):
    """A model or tokenizer cannot be used."""


class NonFiniteError(PreftuneError):
    """Loss, gradients or weights became NaN or infinite."""


class JudgeError(PreftuneError):
    """A judge of online training failed: it raised, or returned scores that cannot be used. Names the prompt."""


class Terminated(KeyboardInterrupt):
    """SIGTERM before a run's first step (loading, tokenising, building the reference table): there is nothing
    to checkpoint yet, so the run stops as after Ctrl-C, its files and worker processes cleaned up."""
