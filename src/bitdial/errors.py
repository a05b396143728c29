"""Exceptions with messages that name the problem and the fix."""


class BitdialError(Exception):
    """Base class of every error bitdial raises on bad input."""


class ModelNotFoundError(BitdialError, FileNotFoundError):
    """A model path, directory or package is missing."""


class ModelFormatError(BitdialError, ValueError):
    """A model file or directory exists but cannot be read: corrupt, truncated, foreign or unsupported."""


class ArtifactError(BitdialError, ValueError):
    """A .bitdial artifact is corrupt, truncated, foreign or of an unknown version."""


class BudgetError(BitdialError, ValueError):
    """A precision budget that no assignment can satisfy."""
