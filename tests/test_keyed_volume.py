"""The client's own defaults at production volume: an Idempotency-Key on every request, 1080p answers of 8.3 MB,
through a Redis capped at 256 MB, on default settings with two workers (load_tests/keyed_volume.py). The second
release answered 95 of 240 here: every answer was kept 60 s."""

from __future__ import annotations

import pytest

from load_tests.keyed_volume import run


@pytest.mark.heavy
def test_the_client_defaults_over_200_1080p_photos_are_all_answered_within_redis_memory() -> None:
    result = run(images=200, concurrency=8, workers=1)
    assert result.answered == 200 and not result.errors, result
    assert result.full_size == 200, result
    assert result.peak_used_mib < result.maxmemory_mib, result
    # The budget was what held memory down: at this rate delivered answers in their grace would outgrow it.
    assert result.not_kept > 0, result
