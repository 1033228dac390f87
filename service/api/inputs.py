"""Read the image and the body's parameters from any of the three request shapes: multipart, raw body, JSON."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from service.errors import InvalidParameter, PayloadTooLarge, UnsupportedMedia

RAW_TYPES = ("image/", "application/octet-stream")


async def read_input(request: Request, max_image_bytes: int) -> tuple[bytes, dict[str, Any]]:
    """The image bytes, and the parameters the body carries (form fields or JSON fields)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    params: dict[str, Any] = {}
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=32)
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise InvalidParameter("multipart body needs a file field named 'image'", field="image")
        image = await upload.read()
        params = {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
    elif ctype == "application/json":
        try:
            body = await request.json()
        except (ValueError, RecursionError) as exc:
            raise InvalidParameter(f"request body is not valid JSON: {exc}", field="body") from exc
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise InvalidParameter("JSON body needs an 'image' field with base64 bytes", field="image")
        try:
            image = base64.b64decode(body.pop("image"), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidParameter(f"'image' is not valid base64: {exc}", field="image") from exc
        params = body
    elif ctype.startswith(RAW_TYPES):
        image = await request.body()
    else:
        raise UnsupportedMedia(
            f"unsupported request content type {ctype or '(none)'}: send multipart/form-data with an 'image' "
            "file, a raw body with an image/* content type, or application/json with base64 'image'"
        )
    if not image:
        raise InvalidParameter("the image is empty (0 bytes)", field="image")
    if len(image) > max_image_bytes:
        raise PayloadTooLarge(
            f"image of {len(image)} bytes exceeds the upload limit of {max_image_bytes} bytes (max_upload_bytes)",
            limit=max_image_bytes,
        )
    return image, params
