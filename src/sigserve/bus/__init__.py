"""Message buses: the protocol, the in-process ``MemoryBus`` and ``NatsBus`` (JetStream).

>>> bus = open_bus("memory://")      # or "nats://127.0.0.1:4222"
"""

from __future__ import annotations

from .base import Bus, BusMessage, PublishAck, Subscription, open_bus, subject_matches
from .memory import MemoryBus

__all__ = ["Bus", "BusMessage", "MemoryBus", "PublishAck", "Subscription", "open_bus", "subject_matches"]
