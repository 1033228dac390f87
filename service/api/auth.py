"""API keys on REST: `Authorization: Bearer KEY` or `X-API-Key: KEY`, checked against the app's one key source
(service/keys.py: configured keys and a secrets directory, compared in constant time)."""

from __future__ import annotations

from fastapi import Request

from service.errors import Unauthorized
from service.keys import ApiKeys, presented_key


def check_api_key(request: Request) -> None:
    keys: ApiKeys = request.app.state.api_keys
    given = presented_key({k: request.headers[k] for k in ("x-api-key", "authorization") if k in request.headers})
    if given is None:
        raise Unauthorized("an API key is required: send `Authorization: Bearer KEY` or `X-API-Key: KEY`")
    if not keys.valid(given):
        raise Unauthorized("the API key is not valid")
