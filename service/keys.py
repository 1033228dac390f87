"""The accepted API keys, one source for REST and gRPC: the configured ones plus one per file of a secrets
directory (a mounted Kubernetes Secret), re-read as it changes so a key rotates without a restart; a presented
key is compared with every accepted one in constant time. Also the start-up rule that refuses to serve open
where nobody said so."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

from service.config import Settings

log = logging.getLogger(__name__)

#: A key file larger than this is no key (a certificate or a bundle mounted in the wrong place): skipped.
MAX_KEY_BYTES = 4096
Role = Literal["serve", "api", "grpc"]


def read_key_dir(directory: Path) -> tuple[bytes, ...]:
    """One key per file: its content without surrounding whitespace. Hidden entries are skipped (a mounted
    Secret's `..data` and timestamped folders), as are empty, oversized and unreadable files."""
    keys: list[bytes] = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("API key file %s is unreadable (%s); skipped", path, exc.strerror or exc)
            continue
        if len(data) > MAX_KEY_BYTES:
            log.warning("API key file %s holds %d bytes, more than a key (%d); skipped", path, len(data), MAX_KEY_BYTES)
            continue
        if key := data.strip():
            keys.append(key)
    return tuple(keys)


class ApiKeys:
    """`valid(given)` against the configured keys and the directory's; the directory is re-read at most every
    `reload_s` seconds. A directory that cannot be read keeps the last keys read from it (and says so)."""

    def __init__(
        self,
        keys: Iterable[str] = (),
        directory: Path | None = None,
        reload_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fixed = tuple(k.encode() for k in keys if k)
        self.directory = directory
        self.reload_s = reload_s
        self.clock = clock
        self._from_dir: tuple[bytes, ...] = ()
        self._read_at: float | None = None

    @classmethod
    def of(cls, settings: Settings) -> ApiKeys:
        keys = [k.get_secret_value() for k in settings.api_keys]
        return cls(keys, settings.api_keys_dir, settings.api_keys_reload_s)

    @property
    def configured(self) -> bool:
        """Keys are given, or a directory for them: requests must carry one (even while the directory is empty)."""
        return bool(self.fixed) or self.directory is not None

    def current(self) -> tuple[bytes, ...]:
        if self.directory is not None:
            now = self.clock()
            if self._read_at is None or now - self._read_at >= self.reload_s:
                self._read_at = now
                self._reload(self.directory)
        return self.fixed + self._from_dir

    def _reload(self, directory: Path) -> None:
        try:
            keys = read_key_dir(directory)
        except OSError as exc:
            log.warning("API key directory %s is unreadable (%s); keeping its last keys", directory, exc)
            return
        if keys != self._from_dir:
            log.info("API keys: %d from %s", len(keys), directory)
            self._from_dir = keys

    def valid(self, given: str | bytes | None) -> bool:
        """No early exit: the time taken says neither which key came close nor how many there are to try."""
        if not given:
            return False
        presented = given.encode() if isinstance(given, str) else given
        valid = False
        for key in self.current():
            valid |= hmac.compare_digest(presented, key)
        return valid


def checks_keys(settings: Settings, keys: ApiKeys) -> bool:
    """Whether requests must carry a key: `auth = on` always, `off` never, `auto` when keys are configured (a
    process without them was refused at start unless it may run open: `auth_refusal`)."""
    return settings.auth == "on" or (settings.auth == "auto" and keys.configured)


def presented_key(headers: dict[str, str]) -> str | None:
    """`x-api-key: KEY` or `authorization: Bearer KEY` (lower-case names), as REST and gRPC both accept them."""
    given = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return given or None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`; a name or a wildcard (0.0.0.0, ::, '') may be reached from elsewhere."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def auth_refusal(settings: Settings, role: Role, hosts: Sequence[str]) -> str | None:
    """Why this process must not start as configured (one line naming the fix), or None. `api` and `grpc` serve
    other machines by design and need keys; `serve` may run open on loopback (a laptop), not where others reach
    it. `auth = off` says openness is meant; keys with it would be a contradiction, refused as well."""
    keys = ApiKeys.of(settings)
    if settings.api_keys_dir is not None and not settings.api_keys_dir.is_dir():
        return f"api_keys_dir {settings.api_keys_dir} is not a directory (DENSE_API_KEYS_DIR, --api-keys-dir)"
    if settings.auth == "off":
        if keys.configured:
            return (
                "auth is off (--no-auth, DENSE_AUTH=off) but API keys are configured (api_keys, api_keys_dir); "
                "drop one of the two"
            )
        return None
    if keys.configured:
        if settings.api_keys_dir is not None and not keys.current():
            return (
                f"api_keys_dir {settings.api_keys_dir} holds no key (one key per file, hidden files skipped); "
                "add one, or give --api-key KEY"
            )
        return None
    fix = "give --api-key KEY (or DENSE_API_KEYS, or DENSE_API_KEYS_DIR: a directory of key files)"
    if role != "serve":
        return (
            f"dense-serve {role} has no API key and would answer anyone who reaches it: {fix}, or --no-auth "
            "(DENSE_AUTH=off) to serve open on purpose"
        )
    if settings.auth == "on":
        return f"auth is on (DENSE_AUTH=on) and no API key is configured: {fix}"
    exposed = [h for h in hosts if not is_loopback(h)]
    if exposed:
        return (
            f"dense-serve serve listens on {exposed[0]} (reachable from other machines) without an API key: {fix}, "
            "or --no-auth (DENSE_AUTH=off) to serve open on purpose"
        )
    return None
