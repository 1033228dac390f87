"""Every Redis key dense-serve uses, with its lifetime, in one place.

All keys of a deployment carry the hash tag `{prefix}`, so they live in one Redis Cluster slot: the Lua scripts
and transactions that touch a job's stream entry, its reply stream and its stored result stay valid on a
cluster (on one primary: scale out with more deployments, each its own prefix).

| key | what | lifetime |
|---|---|---|
| `{p}:jobs:{model}` | stream of jobs, consumer group `workers` | entry deleted when acknowledged |
| `{p}:replies:{api}` | one API instance's reply stream | entry deleted once read; key TTL 5 min, refreshed |
| `{p}:result:{id}` | a keyed answer, for retries, within `answer_store_bytes` | grace once delivered, else TTL |
| `{p}:answered:{id}` | the keyed job was answered (a retry finding no result computes again) | as its Idempotency-Key |
| `{p}:idem:{sha}` | Idempotency-Key -> job id, fingerprint, deadline | grace once delivered, else TTL |
| `{p}:kept:expiry` | sorted set: kept answers by expiry (ms), to release their bytes | entries removed as they expire |
| `{p}:kept:bytes` | hash: each kept answer's bytes, and `_total` against `answer_store_bytes` | as above |

(grace: `answer_grace_s`; TTL: `result_ttl_s`.)
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

    def answered(self, job_id: str) -> str:
        return f"{self.tag}:answered:{job_id}"

    def kept_expiry(self) -> str:
        return f"{self.tag}:kept:expiry"

    def kept_bytes(self) -> str:
        return f"{self.tag}:kept:bytes"

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
