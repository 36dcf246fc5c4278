"""The DHT layer's errors: what ``DhtNode.put``/``get`` raise instead of None/False.

One family (:class:`DhtError`) that the proxy maps to a 5xx; ``record.RecordTooLarge``
is the record codec's own. This module imports nothing of the DHT engine (kademlia,
rpcudp, umsgpack), so callers can catch these errors without loading it.
"""

from __future__ import annotations

__all__ = ["DhtError", "DhtRejected", "DhtUnavailable", "InvalidBindings"]


class DhtError(Exception):
    """The DHT could not do what was asked (the proxy answers 5xx)."""


class DhtUnavailable(DhtError):
    """No peers are known, or none of the nodes asked answered."""


class DhtRejected(DhtError):
    """Nodes answered, but every one of them refused the record."""


class InvalidBindings(DhtError, ValueError):
    """``put`` was given bindings of another AOR, or ones our trust store cannot verify."""
