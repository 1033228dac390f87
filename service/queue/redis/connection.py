"""Connecting to Redis: credentials, TLS, what the server can do, and what its errors mean to a client."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, OutOfMemoryError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import Unavailable

log = logging.getLogger(__name__)
MIN_VERSION = (7, 0)
#: What a client reads when Redis fails: no host, no exception text (the log has both).
UNREACHABLE = "the queue is unreachable; retry shortly"


@dataclass(frozen=True)
class ConnectionOptions:
    url: str
    password: str | None = None
    tls_ca_file: Path | None = None
    #: How long a connect may take: an unreachable host is an outage after this. 0.5 s was too short for a pool
    #: opening dozens of connections at once on a loaded 2-core machine (a connect timed out against a healthy
    #: Redis in a full-suite run); a stopped Redis still refuses at once.
    op_timeout_s: float = 1.0
    #: How long a reply may take: longer than a connect, because a busy event loop (a burst of uploads on two
    #: cores) can sit on a reply that Redis sent at once, and slowness is not an outage. A stopped Redis still
    #: fails at once (refused or reset connections), an unreachable host after `op_timeout_s`.
    reply_timeout_s: float = 2.0
    #: Connections one client opens at most. A burst of requests beyond it waits for a free connection (up to
    #: `pool_timeout_s`): slowness, not an outage. redis-py's own pool refused the 101st concurrent command with
    #: "Too many connections", which a burst of 128 uploads turned into 503s against a healthy Redis.
    max_connections: int = 64
    pool_timeout_s: float = 10.0

    def client(self, blocking: bool = False) -> Redis:
        """Short connect timeouts so an outage is a fast 503; blocking reads get a client without a socket
        timeout. Commands wait for a pooled connection rather than fail, and a read that times out waiting for
        its reply is sent once more (`_Client`); nothing else is retried."""
        kwargs: dict[str, Any] = {
            "socket_connect_timeout": self.op_timeout_s,
            "socket_timeout": None if blocking else max(self.op_timeout_s, self.reply_timeout_s),
            "retry": Retry(NoBackoff(), 0),
            "max_connections": self.max_connections,
            "timeout": self.pool_timeout_s,
        }
        if self.password is not None:
            kwargs["password"] = self.password
        if self.url.startswith("rediss://"):
            # Say it rather than trust a client default (redis-py before 6 did not check the name): a certificate
            # signed by the trusted CA for another host is refused.
            kwargs["ssl_check_hostname"] = True
            kwargs["ssl_cert_reqs"] = "required"
        if self.tls_ca_file is not None:
            kwargs["ssl_ca_certs"] = str(self.tls_ca_file)
        return _Client.from_pool(BlockingConnectionPool.from_url(self.url, **kwargs))

    @property
    def has_password(self) -> bool:
        """A password given as a setting or inside the URL (`redis://:pw@host`)."""
        userinfo = self.url.partition("://")[2].partition("/")[0].rpartition("@")[0]
        return self.password is not None or ":" in userinfo

    @property
    def where(self) -> str:
        """The URL without its credentials, fit for messages and logs."""
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"


#: Commands whose repetition changes nothing and whose second reply describes the same state: reads, and writes
#: that set what they set again (EXPIRE; XGROUP CREATE answers BUSYGROUP, which its caller expects). Never XADD,
#: SET NX, XREADGROUP or scripts: a first attempt that did reach Redis would be repeated (a job enqueued twice,
#: a claimed key read as someone else's, entries delivered and lost).
REPEATABLE = frozenset(
    {
        "PING", "INFO", "GET", "MGET", "EXISTS", "TTL", "PTTL", "TYPE", "HGET", "HGETALL", "HLEN", "SCAN", "XLEN",
        "XRANGE", "XREVRANGE", "XREAD", "XPENDING", "XINFO GROUPS", "XINFO CONSUMERS", "XINFO STREAM", "EXPIRE",
        "XGROUP CREATE",
    }
)  # fmt: skip


class _Client(Redis):
    """A Redis client that sends a `REPEATABLE` command once more when its reply did not come within the socket
    timeout: on a healthy server that is a busy event loop (a burst of uploads on two cores) reading a prompt reply
    late, and the second try answers. A refused or reset connection (Redis stopped) and a connect timeout (host
    unreachable) are outages and fail at once, as does any other command (it may have taken effect)."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().execute_command(*args, **options)
        except RedisTimeoutError as exc:
            if "connecting" in str(exc) or str(args[0]).upper() not in REPEATABLE:
                raise
            log.info("Redis: no reply to %s within the socket timeout; sending it once more", args[0])
            return await super().execute_command(*args, **options)


@dataclass(frozen=True)
class ServerInfo:
    version: tuple[int, ...]
    #: XACKDEL (Redis 8.2): acknowledge and delete in one command; else XACK then XDEL in the same script.
    has_xackdel: bool


class RedisSetupError(ValueError):
    """The server cannot be used as configured (wrong password, too old): a start-up error, not a retry."""


async def check_server(r: Redis, where: str, has_password: bool = False) -> ServerInfo:
    """Ping, authenticate and read the version; raise RedisSetupError with a message an operator can act on."""
    try:
        await r.ping()
        info = await r.info("server")
        has_xackdel = await _knows(r, "XACKDEL", "{dense-serve-probe}:none", "workers", "IDS", "1", "0-1")
    except (AuthenticationError, ResponseError) as exc:
        if not isinstance(exc, AuthenticationError) and not any(w in str(exc) for w in ("NOAUTH", "WRONGPASS")):
            raise
        if has_password:
            raise RedisSetupError(
                f"Redis at {where} refused the password ({exc}); set redis_password (DENSE_REDIS_PASSWORD) to "
                "the server's requirepass"
            ) from exc
        raise RedisSetupError(
            f"Redis at {where} needs a password ({exc}); set redis_password (DENSE_REDIS_PASSWORD)"
        ) from exc
    except (RedisError, OSError) as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "SSL" in type(exc.__cause__ or exc).__name__:
            raise RedisSetupError(
                f"Redis at {where}: the TLS handshake failed ({exc}); set redis_tls_ca_file "
                "(DENSE_REDIS_TLS_CA_FILE) to the CA that signed the server's certificate"
            ) from exc
        log.warning("Redis at %s is unreachable: %s", where, exc)
        raise Unavailable(UNREACHABLE, retry_after=1) from exc
    version = tuple(int(p) for p in str(info.get("redis_version", "0")).split(".")[:3] if p.isdigit())
    if version < MIN_VERSION:
        have, need = ".".join(map(str, version)), ".".join(map(str, MIN_VERSION))
        raise RedisSetupError(
            f"Redis at {where} is version {have}; dense-serve needs {need} or newer (consumer-group lag, script flags)"
        )
    return ServerInfo(version, has_xackdel)


async def _knows(r: Redis, *command: str) -> bool:
    """Whether the server has a command that this user may run: run it harmlessly (on a key that does not exist)
    and see. An ACL that denies it (NOPERM) counts as not having it: the scripts then use what they may."""
    try:
        await r.execute_command(*command)
    except NoPermissionError:
        return False
    except ResponseError as exc:
        return "unknown command" not in str(exc).lower()
    return True


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, OutOfMemoryError) or (isinstance(exc, ResponseError) and str(exc).startswith("OOM"))


def unavailable(exc: BaseException, where: str) -> Unavailable:
    """What a Redis failure means to a client: out of memory, or unreachable; both are worth a retry. The client
    reads neither the host nor the exception's text; the log keeps both."""
    log.warning("Redis at %s failed: %s", where, exc)
    if is_oom(exc):
        return Unavailable(
            "the queue is out of memory (maxmemory reached, noeviction): it accepts new jobs again as the queued "
            "ones finish",
            retry_after=2,
        )
    return Unavailable(UNREACHABLE, retry_after=1)
