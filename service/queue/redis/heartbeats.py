"""Who serves what: worker heartbeats (with the models they announce) and the models ever announced.

A worker's heartbeat key lives three heartbeats; when it expires the worker is dead: its models leave the
catalog and its unacknowledged jobs are reclaimed by the others at once (consumer.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.jobs import ModelInfo
from service.queue.redis.connection import unavailable
from service.queue.redis.keys import KNOWN_MODELS_TTL_S, Keys
from service.queue.redis.scripts import Scripts

log = logging.getLogger(__name__)
CATALOG_CACHE_S = 0.5


class Heartbeats:
    def __init__(self, r: Redis, keys: Keys, scripts: Scripts, heartbeat_s: float, where: str) -> None:
        self.r = r
        self.keys = keys
        self.scripts = scripts
        self.heartbeat_s = heartbeat_s
        self.where = where
        self.infos: list[ModelInfo] = []
        self._catalog: tuple[float, list[ModelInfo]] = (0.0, [])

    @property
    def ttl_s(self) -> int:
        return max(1, round(self.heartbeat_s * 3))

    # ---- worker side

    async def beat(self, consumer: str) -> None:
        """One heartbeat: this worker is alive and serves `infos` (which are remembered for scale from zero)."""
        body = json.dumps({"consumer": consumer, "models": [i.model_dump() for i in self.infos]})
        await self.scripts.heartbeat(
            self.keys.worker(consumer),
            self.keys.known_models(),
            body,
            self.ttl_s,
            KNOWN_MODELS_TTL_S,
            {i.id: i.model_dump_json() for i in self.infos},
        )

    async def beat_forever(self, consumer: str, closed: asyncio.Event) -> None:
        """Beat until the worker closes, also while it drains with no models announced: a draining worker
        is alive, and its jobs are not to be reclaimed."""
        while not closed.is_set():
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.beat(consumer)
            except (RedisError, OSError) as exc:
                log.debug("heartbeat failed: %s", exc)

    async def leave(self, consumer: str) -> None:
        """The worker is gone for good: no heartbeat to wait out."""
        await self.r.delete(self.keys.worker(consumer))

    async def alive(self, consumers: list[str]) -> set[str]:
        """Which of these consumers have a live heartbeat."""
        if not consumers:
            return set()
        async with self.r.pipeline(transaction=False) as pipe:
            for name in consumers:
                pipe.exists(self.keys.worker(name))
            found = await pipe.execute()
        return {name for name, n in zip(consumers, found, strict=True) if n}

    # ---- front-end side

    async def catalog(self) -> list[ModelInfo]:
        """Models some live worker serves and has warmed up (cached for half a second)."""
        stamp, cached = self._catalog
        if time.monotonic() - stamp < CATALOG_CACHE_S:
            return cached
        try:
            infos: dict[str, ModelInfo] = {}
            async for key in self.r.scan_iter(match=self.keys.workers_pattern(), count=100):
                raw = await self.r.get(key)
                if raw:
                    for item in json.loads(raw)["models"]:
                        infos.setdefault(item["id"], ModelInfo(**item))
        except (RedisError, OSError) as exc:
            raise unavailable(exc, self.where) from exc
        result = sorted(infos.values(), key=lambda m: m.id)
        self._catalog = (time.monotonic(), result)
        return result

    async def declare(self, infos: list[ModelInfo]) -> None:
        """Front-end side: remember configured models without overwriting what a worker announced."""
        known = self.keys.known_models()
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                for info in infos:
                    pipe.hsetnx(known, info.id, info.model_dump_json())
                pipe.expire(known, KNOWN_MODELS_TTL_S)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise unavailable(exc, self.where) from exc

    async def dormant(self) -> list[ModelInfo]:
        """Models served before that have no live worker now (scaled to zero)."""
        try:
            known = await self.r.hgetall(self.keys.known_models())
        except (RedisError, OSError) as exc:
            raise unavailable(exc, self.where) from exc
        live = {m.id for m in await self.catalog()}
        infos = [ModelInfo.model_validate_json(v) for v in known.values()]
        return sorted((i for i in infos if i.id not in live), key=lambda m: m.id)
