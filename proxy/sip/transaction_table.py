"""Live transactions by key, for an adapter that wants its matching and timers done."""

from __future__ import annotations

from .matching import TransactionKey, client_key, invite_key_for_cancel, server_key
from .message import Request, Response
from .transaction import (
    ClientState,
    ClientTransaction,
    ServerState,
    ServerTransaction,
    TransactionError,
)

AnyTransaction = ServerTransaction | ClientTransaction


class TransactionTable:
    """Live transactions by key, for matching (§17.1.3, §17.2.3) and timer scheduling.

    ``next_timer`` and ``due`` scan every transaction: simple, and cheap enough for the
    few thousand transactions one proxy holds at a time.
    """

    __slots__ = ("client", "server")

    def __init__(self) -> None:
        self.server: dict[TransactionKey, ServerTransaction] = {}
        self.client: dict[TransactionKey, ClientTransaction] = {}

    def __len__(self) -> int:
        return len(self.server) + len(self.client)

    def _all(self) -> list[AnyTransaction]:
        return [*self.server.values(), *self.client.values()]

    def add_server(self, txn: ServerTransaction) -> None:
        """Raises TransactionError if a transaction with the same key exists."""
        if txn.key in self.server:
            raise TransactionError("a transaction with this key exists")
        self.server[txn.key] = txn

    def add_client(self, txn: ClientTransaction) -> None:
        """Raises TransactionError if a transaction with the same key exists."""
        if txn.key in self.client:
            raise TransactionError("a transaction with this key exists")
        self.client[txn.key] = txn

    def match_request(self, request: Request) -> ServerTransaction | None:
        """The server transaction of a retransmission or ACK, if there is one."""
        return self.server.get(server_key(request))

    def match_cancel(self, cancel: Request) -> ServerTransaction | None:
        """The INVITE server transaction a CANCEL is for, if there is one."""
        return self.server.get(invite_key_for_cancel(cancel))

    def match_response(self, response: Response) -> ClientTransaction | None:
        return self.client.get(client_key(response))

    def remove_server(self, txn: ServerTransaction) -> None:
        if self.server.get(txn.key) is txn:
            del self.server[txn.key]

    def remove_client(self, txn: ClientTransaction) -> None:
        if self.client.get(txn.key) is txn:
            del self.client[txn.key]

    def next_timer(self) -> float | None:
        """The earliest ``get_timer()`` of all transactions."""
        times = [t for txn in self._all() if (t := txn.get_timer()) is not None]
        return min(times, default=None)

    def due(self, now: float) -> list[AnyTransaction]:
        """Transactions whose timer is due: call ``handle_timer(now)`` on each."""
        return [txn for txn in self._all() if (t := txn.get_timer()) is not None and t <= now]

    def remove_terminated(self) -> list[AnyTransaction]:
        """Drop and return every transaction in Terminated."""
        servers = [t for t in self.server.values() if t.state is ServerState.TERMINATED]
        clients = [t for t in self.client.values() if t.state is ClientState.TERMINATED]
        for s in servers:
            del self.server[s.key]
        for c in clients:
            del self.client[c.key]
        return [*servers, *clients]
