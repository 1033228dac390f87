"""The Redis Streams queue, split by role: `keys` (every key and lifetime), `submitter` (front-ends),
`consumer` (workers: read, answer, retry, dead-letter, reclaim), `heartbeats` (worker heartbeats, announced models),
`scripts` (the atomic state changes), `connection` (credentials, TLS, server checks), joined by `broker`."""

from service.queue.redis.broker import RedisBroker
from service.queue.redis.connection import ConnectionOptions, RedisSetupError, check_server
from service.queue.redis.consumer import RedisDelivery
from service.queue.redis.counters import RedisStats
from service.queue.redis.keys import GROUP, Keys

__all__ = [
    "GROUP",
    "ConnectionOptions",
    "Keys",
    "RedisBroker",
    "RedisDelivery",
    "RedisSetupError",
    "RedisStats",
    "check_server",
]
