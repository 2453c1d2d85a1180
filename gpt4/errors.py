"""Errors a user can cause and fix. The CLI prints their message (no traceback) and exits non-zero."""


class GPT4Error(Exception):
    """Base class: the message says what was wrong and what to do next."""


class ModelNotFoundError(GPT4Error):
    """An unknown model name, a missing file, or a model that is not installed."""


class ModelFileError(GPT4Error):
    """A model file that is truncated, corrupted, of an unsupported kind, or that does not match its config."""


def check_flags(*checks: tuple[str, object, bool, str]) -> None:
    """GPT4Error for the first (flag, value, ok, rule) that is not ok: "{flag} must be {rule}, got {value}."."""
    for flag, value, ok, rule in checks:
        if not ok:
            raise GPT4Error(f"{flag} must be {rule}, got {value}.")


class GenerationSettingError(GPT4Error, ValueError):
    """A generation setting out of its range (a ValueError too, as transformers raises for these)."""
