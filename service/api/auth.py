"""Optional API keys: `Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import Unauthorized


def check_api_key(request: Request) -> None:
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not given:
        raise Unauthorized("an API key is required: send `Authorization: Bearer KEY` or `X-API-Key: KEY`")
    valid = False
    for key in keys:  # no early exit: the time taken does not say which key came close
        valid |= hmac.compare_digest(given.encode(), key.get_secret_value().encode())
    if not valid:
        raise Unauthorized("the API key is not valid")
