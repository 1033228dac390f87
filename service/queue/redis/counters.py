"""What one broker instance did, as counters the tests and the chaos runs read (the metrics carry the same)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RedisStats:
    # worker side
    reclaimed_from_dead: int = 0  # jobs of consumers whose heartbeat expired, claimed at once
    reclaimed_from_hung: int = 0  # jobs idle past min_idle_ms under a live heartbeat
    requeued: int = 0  # a failed job put back for another worker
    dead_lettered: int = 0
    late_replies_discarded: int = 0  # answers for jobs another worker had reclaimed meanwhile
    unreadable_entries: int = 0
    # front-end side
    orphan_replies: int = 0  # replies for requests no longer waiting here (answered, timed out, cancelled)
    rejected_out_of_memory: int = 0  # submissions Redis refused at maxmemory

    @property
    def reclaimed(self) -> int:
        return self.reclaimed_from_dead + self.reclaimed_from_hung
