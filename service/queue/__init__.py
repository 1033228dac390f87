"""The queue between front-ends and workers: one `Broker` interface, an in-process and a Redis implementation."""

from service.queue.base import Broker, Delivery
from service.queue.memory import MemoryBroker

__all__ = ["Broker", "Delivery", "MemoryBroker"]
