"""What a route needs from the app, as a FastAPI dependency: settings, broker, limits, the models to wait for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import Request

from service.config import Settings
from service.queue.base import Broker
from service.request import Limits


@dataclass(frozen=True)
class Context:
    settings: Settings
    broker: Broker
    limits: Limits
    expected_models: Sequence[str]


def context(request: Request) -> Context:
    state = request.app.state
    return Context(state.settings, state.broker, state.limits, state.expected_models)
