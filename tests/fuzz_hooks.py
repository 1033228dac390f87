"""schemathesis hooks for the OpenAPI fuzz test (`tests/test_openapi_fuzz.py`, `make fuzz`).

Loaded by `st run` through `SCHEMATHESIS_HOOKS=tests.fuzz_hooks`:
- request bodies declared as images (raw `image/*`, `application/octet-stream`, a multipart `image` file, JSON's
  base64 `image`) are real encoded images of random size and content, so schema-valid cases reach the model
  instead of stopping at the decoder;
- a 504 is a failure unless the case asked for a short deadline itself (`timeout_ms`): the answer to a deadline
  the client chose is documented, a 504 under a generous one is a bug;
- schemathesis' own "schema-valid request rejected" check is replaced by `schema_valid_requests_accepted`, the
  same check less the 422s that depend on the served model or on another field (see MODEL_DEPENDENT_FIELDS).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image

#: A 504 under a deadline of at most this many milliseconds is the answer the client asked for.
SHORT_DEADLINE_MS = 5000


@st.composite
def images(draw: st.DrawFn, formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP")) -> bytes:
    height = draw(st.integers(1, 96))
    width = draw(st.integers(1, 96))
    mode = draw(st.sampled_from(("RGB", "L", "RGBA", "I;16")))
    fmt = draw(st.sampled_from(formats))
    if fmt in ("JPEG", "WEBP", "BMP") and mode == "I;16":
        mode = "L"
    if fmt == "JPEG" and mode == "RGBA":
        mode = "RGB"
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode, 1)
    if mode == "I;16":
        pixels = rng.integers(0, 65536, (height, width), dtype=np.uint16)
        image = Image.fromarray(pixels)
    else:
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


for media, formats in {
    "image/png": ("PNG",),
    "image/jpeg": ("JPEG",),
    "image/webp": ("WEBP",),
    "application/octet-stream": ("PNG", "JPEG", "WEBP", "BMP"),
    "image/*": ("PNG", "JPEG", "WEBP", "BMP"),
}.items():
    schemathesis.openapi.media_type(media, images(formats))
schemathesis.openapi.format("binary", images())
schemathesis.openapi.format("byte", images().map(lambda data: base64.b64encode(data).decode()))


def _timeout_ms(case: Any) -> int | None:
    for source in (case.body if isinstance(case.body, dict) else None, case.query):
        if source and source.get("timeout_ms") is not None:
            try:
                return int(source["timeout_ms"])
            except (TypeError, ValueError):
                return None
    return None


@schemathesis.check
def deadline_504_only_when_asked(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code == 504:
        asked = _timeout_ms(case)
        if asked is None or asked > SHORT_DEADLINE_MS:
            raise AssertionError(f"504 under a deadline of {asked or 'the server default'} ms")
    return None


#: A 422 naming one of these fields depends on the served model (a single-step family refuses `steps` other than
#: 1, `ensemble_size`, `method` other than seeds, `uncertainty=steps`: the schema describes every family) or on
#: another field (`with_depth` and `uncertainty=steps` need `format=json`); the schema cannot say either, so such
#: a 422 is no schema violation. tests/test_multistep_api.py and tests/test_probes.py check those refusals themselves.
MODEL_DEPENDENT_FIELDS = frozenset({"steps", "ensemble_size", "method", "uncertainty"})
ACCEPTED = ("2", "3")  # 2xx, 3xx
ACCEPTED_CODES = frozenset({401, 403, 404, 409, 429})


def _model_dependent(response: Any) -> bool:
    try:
        problem = response.json()
    except ValueError:
        return False
    field = problem.get("field")
    return field in MODEL_DEPENDENT_FIELDS or (field == "request" and "with_depth" in str(problem.get("detail")))


@schemathesis.check
def schema_valid_requests_accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis' positive_data_acceptance (disabled in schemathesis.toml), less the model-dependent 422s."""
    meta = getattr(case, "meta", None)
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if str(status)[0] in ACCEPTED or status in ACCEPTED_CODES or status >= 500:  # 5xx: not_a_server_error's job
        return None
    if status == 422 and _model_dependent(response):
        return None
    raise AssertionError(f"a schema-valid request was refused with {status}: {response.text[:300]}")
