"""dense-serve's Python client: depth, normals and uncertainty maps as numpy arrays, in three lines.

    from dense_serve_client import Client
    with Client("http://127.0.0.1:8000") as client:
        depth = client.depth("photo.jpg").array  # float32 [H, W]

`AsyncClient` has the same methods as coroutines; `StreamClient` (the `grpc` extra) streams camera frames over
gRPC. No torch: this package needs httpx, numpy and Pillow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dense_serve_client._core import NO_RETRY, RetryPolicy
from dense_serve_client.client import AsyncClient, Client
from dense_serve_client.errors import (
    APIError,
    DeadlineExceeded,
    DenseServeError,
    InvalidParameter,
    ModelFailure,
    ModelNotFound,
    NotAcceptable,
    PayloadTooLarge,
    QueueFull,
    TaskNotServed,
    TransportError,
    Unauthorized,
    Unavailable,
    UnsupportedMedia,
)
from dense_serve_client.results import Health, ModelInfo, Prediction, UncertaintyPrediction, colorize

if TYPE_CHECKING:
    from dense_serve_client.stream import FrameStream, StreamClient, StreamFrame

__version__ = "0.1.0"
__all__ = [
    "NO_RETRY",
    "APIError",
    "AsyncClient",
    "Client",
    "DeadlineExceeded",
    "DenseServeError",
    "FrameStream",
    "Health",
    "InvalidParameter",
    "ModelFailure",
    "ModelInfo",
    "ModelNotFound",
    "NotAcceptable",
    "PayloadTooLarge",
    "Prediction",
    "QueueFull",
    "RetryPolicy",
    "StreamClient",
    "StreamFrame",
    "TaskNotServed",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "UncertaintyPrediction",
    "UnsupportedMedia",
    "__version__",
    "colorize",
]


def __getattr__(name: str) -> Any:
    """The gRPC parts load on first use, so a REST-only user needs neither grpcio nor protobuf."""
    if name in ("StreamClient", "StreamFrame", "FrameStream"):
        from dense_serve_client import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'dense_serve_client' has no attribute {name!r}")
