"""Errors raised by undiscard.

Every error says what was expected, what came, and what to do about it. They all
derive from :class:`UndiscardError`, so a caller can catch the library's own
failures without catching bugs.
"""

from __future__ import annotations

__all__ = ["UndiscardError", "NoSubsamplingSiteError", "InputError", "StateError", "OptionError",
           "ModelModeError", "SplitError", "FileTrustError", "UnknownModelError", "SiteMismatchError",
           "DatasetNotFoundError", "ConfigError", "MissedSubsamplingWarning"]


class UndiscardError(Exception):
    """Base class of every error undiscard raises on purpose."""


class NoSubsamplingSiteError(UndiscardError):
    """The model has no strided op, pooling, patch embedding or patch merging."""


class InputError(UndiscardError, ValueError):
    """The example / run input has the wrong rank, or is too small for the network."""


class StateError(UndiscardError, ValueError):
    """A state of the wrong length, a non-integer offset, or an offset out of range for its site."""


class OptionError(UndiscardError, ValueError):
    """An option outside its allowed values: criterion, aggregate, engine, budget, max_batch, fill ..."""


class ModelModeError(UndiscardError, RuntimeError):
    """The model is in train mode where the computation needs eval mode (or an explicit opt-in)."""


class SplitError(UndiscardError, ValueError):
    """A features / head split that is malformed or does not reproduce the model."""


class FileTrustError(UndiscardError, PermissionError):
    """A file that could run code when loaded (a pickle), refused without an explicit opt-in."""


class UnknownModelError(UndiscardError, LookupError):
    """A model name that no zoo knows, or a checkpoint path that does not exist."""


class SiteMismatchError(UndiscardError, RuntimeError):
    """The model ran different subsampling ops than the ones its sites were found on."""


class DatasetNotFoundError(UndiscardError, FileNotFoundError):
    """Data files or folders that are not where they were looked for."""


class ConfigError(UndiscardError, ValueError):
    """A fitted configuration (``undiscard fit``) that cannot be applied: unreadable, or made for another model."""


class MissedSubsamplingWarning(UserWarning):
    """The model reduces a grid somewhere no site accounts for (:attr:`SiteMap.missed`):
    its offsets there are never searched and the displacement of later sites is off."""
