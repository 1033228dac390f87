"""Every Redis key dense-serve uses, with its lifetime, in one place.

All keys of a deployment carry the hash tag `{prefix}`, so they live in one Redis Cluster slot: the Lua scripts
and transactions that touch a job's stream entry, its reply stream and its stored result stay valid on a
cluster (on one primary: scale out with more deployments, each its own prefix).

| key | what | lifetime |
|---|---|---|
| `{p}:jobs:{model}` | stream of jobs, consumer group `workers` | entry deleted when acknowledged |
| `{p}:replies:{api}` | one API instance's reply stream | entry deleted once read; key TTL 5 min, refreshed |
| `{p}:result:{id}` | the answer, for Idempotency-Key retries only | `result_ttl_s` |
| `{p}:idem:{sha}` | Idempotency-Key -> job id, fingerprint, deadline | `result_ttl_s` |
| `{p}:cancel:{id}` | the client gave up: workers drop the job | until the job's deadline |
| `{p}:worker:{name}` | a worker's heartbeat and the models it serves | 3 heartbeats |
| `{p}:models:known` | every model a worker announced (scale from zero) | a week, refreshed |
| `{p}:dead:{model}` | dead-lettered jobs (no image), for inspection | 1000 entries, a week |
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"
REPLY_STREAM_TTL_S = 300
#: Safety caps only: entries are deleted as they are consumed, so these are never reached in normal operation.
REPLY_STREAM_MAXLEN = 10_000
DEAD_MAXLEN = 1000
DEAD_TTL_S = 7 * 24 * 3600
KNOWN_MODELS_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Keys:
    prefix: str

    @property
    def tag(self) -> str:
        return "{" + self.prefix + "}"

    def jobs(self, model: str) -> str:
        return f"{self.tag}:jobs:{model}"

    def replies(self, instance: str) -> str:
        return f"{self.tag}:replies:{instance}"

    def result(self, job_id: str) -> str:
        return f"{self.tag}:result:{job_id}"

    def idem(self, key_hash: str) -> str:
        return f"{self.tag}:idem:{key_hash}"

    def cancel(self, job_id: str) -> str:
        return f"{self.tag}:cancel:{job_id}"

    def worker(self, consumer: str) -> str:
        return f"{self.tag}:worker:{consumer}"

    def workers_pattern(self) -> str:
        """A SCAN pattern for every worker heartbeat (braces are literal in Redis globs)."""
        return f"{self.tag}:worker:*"

    def known_models(self) -> str:
        return f"{self.tag}:models:known"

    def dead(self, model: str) -> str:
        return f"{self.tag}:dead:{model}"
