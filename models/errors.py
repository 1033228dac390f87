"""Typed failures of the model side, so front-ends can map them to status codes in one table."""


class ModelError(Exception):
    """Base class of every error raised by the model side."""


class ModelLoadError(ModelError):
    """A checkpoint cannot be found, fetched, or does not match its spec."""


class SpecError(ModelError):
    """A model spec file or argument is malformed."""


class BackendError(ModelError):
    """A backend is missing, misconfigured, or failed to run a graph."""


class UnsafeFormatError(ModelLoadError):
    """Weights or training state stored only as pickle (`.bin`, `.pt`, ...), which is never loaded: unpickling
    can run code, so only safetensors (tensors) and JSON (the rest) are read."""
