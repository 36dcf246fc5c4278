"""What the admin API needs from a site: the :class:`AdminServices` protocol.

The routes talk to nothing else. Results are the site's own plain types (``Binding``,
``DhtBinding``, ``UserRecord``) or the small frozen dataclasses below; the routes turn
them into the pydantic schemas. Errors are :class:`ServiceError` subclasses that carry
the HTTP status to answer with, as the SIP layers' errors carry a SIP status.

The admin API imports nothing of the site: the types it shows are protocols defined
here, which the site's own types satisfy. ``proxy.admin_services.SiteServices``
implements :class:`AdminServices` over a running site.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class Binding(Protocol):
    """A binding of this site's registrar, as the API shows it."""

    @property
    def contact(self) -> str: ...
    @property
    def expires_at(self) -> float: ...
    @property
    def q(self) -> float: ...
    @property
    def source(self) -> str: ...
    @property
    def call_id(self) -> str: ...
    @property
    def cseq(self) -> int: ...
    @property
    def instance(self) -> str | None: ...
    @property
    def reg_id(self) -> int | None: ...
    @property
    def path(self) -> tuple[str, ...]: ...
    @property
    def registered_at(self) -> float: ...
    def remaining(self, now: float) -> int: ...


class DhtBinding(Protocol):
    """A verified binding of any site, as the DHT holds it."""

    @property
    def contact(self) -> str: ...
    @property
    def home(self) -> str: ...
    @property
    def site(self) -> str: ...
    @property
    def key_id(self) -> str: ...
    @property
    def expires_at(self) -> float: ...
    @property
    def q(self) -> float: ...
    @property
    def version(self) -> int: ...
    @property
    def instance(self) -> str | None: ...
    @property
    def reg_id(self) -> int | None: ...
    def expires_in(self, now: float) -> int: ...


class UserRecord(Protocol):
    """A user who may register: the name and which digest HA1s it has (never shown)."""

    @property
    def username(self) -> str: ...
    @property
    def ha1_md5(self) -> str | None: ...
    @property
    def ha1_sha256(self) -> str | None: ...


class ServiceError(Exception):
    """A request the site cannot carry out; ``status_code`` is the HTTP answer."""

    status_code = 500


class InvalidInput(ServiceError):
    status_code = 400


class Forbidden(ServiceError):
    """A signed change whose signature does not verify."""

    status_code = 403


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class Unavailable(ServiceError):
    """A backend (Redis, the DHT) did not answer."""

    status_code = 503


@dataclass(frozen=True, slots=True)
class Check:
    """One readiness condition: ``ok`` and what was seen."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Registration:
    aor: str
    bindings: tuple[Binding, ...]


@dataclass(frozen=True, slots=True)
class RegistrationPage:
    items: tuple[Registration, ...]
    next_after: str | None  # pass as ``after`` for the next page; None on the last one


@dataclass(frozen=True, slots=True)
class DhtView:
    """What the DHT holds for one AOR, or why it could not say."""

    bindings: tuple[DhtBinding, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Peer:
    node_id: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class DhtInfo:
    node_id: str
    host: str
    port: int
    site_id: str
    home: str  # the SIP URI other sites reach this proxy at
    key_id: str  # the site's signing key
    peers: tuple[Peer, ...]
    stored_records: int


@dataclass(frozen=True, slots=True)
class MemberSite:
    """A member site as this site sees it."""

    site_id: str
    home: str  # its home proxy's SIP URI
    key_id: str  # the key its bindings are signed with
    reachable: bool | None  # None: not asked yet
    last_heard: float | None  # wall clock of its last answer
    rtt: float | None  # seconds, of its last answer to a probe
    bindings_seen: int  # its live bindings this site has seen in lookups


@dataclass(frozen=True, slots=True)
class Lookup:
    aor: str
    seconds: float
    bindings: tuple[DhtBinding, ...]  # live and signature-checked
    rejected: int  # bindings in the answers that failed verification during the lookup


@dataclass(frozen=True, slots=True)
class SiteStats:
    """The counters an admin looks at, plus every raw counter of the site."""

    requests: Mapping[str, int]  # method -> requests received
    responses_received: Mapping[str, int]  # "2xx" -> count
    responses_sent: Mapping[str, int]
    server_transactions: int
    client_transactions: int
    registered_aors: int | None  # None when the location store cannot be read
    registered_bindings: int | None
    users: int
    registers_ok: int
    auth_failures: int
    parse_errors: int
    calls_routed_local: int
    calls_routed_dht: int
    dht_retries: int
    dht_puts_ok: int
    dht_puts_failed: int
    dht_puts_skipped: int
    dht_gets_ok: int
    dht_gets_failed: int
    dht_backlog: int
    dht_lookups: int
    dht_cache_hits: int
    dht_cache_misses: int
    dht_peers: int
    dht_records_accepted: int
    dht_records_rejected: int  # refused by this node's store (bad signature, too big)
    dht_bindings_rejected_on_get: int  # failed verification in lookup answers
    dht_rpc_timeouts: int
    counters: Mapping[str, float] = field(default_factory=dict)  # the raw snapshot
    sites: Sequence[MemberSite] = ()


@dataclass(frozen=True, slots=True)
class UserChange:
    """A user to create or replace: a password (hashed at once) or precomputed HA1s."""

    username: str
    password: str | None = None
    ha1_md5: str | None = None
    ha1_sha256: str | None = None


@dataclass(frozen=True, slots=True)
class TrustedKeyInfo:
    """A site key this site trusts, and why."""

    key_id: str
    public_key: bytes  # raw 32 bytes
    own: bool  # this site's own key
    file: str | None  # the file in the trust folder that trusts it
    endorsed_by: str | None  # the key whose endorsement trusts it
    scope: tuple[str, ...] | None  # what it may publish bindings for; None: any AOR


@dataclass(frozen=True, slots=True)
class Trust:
    folder: str | None  # None: the site has no trust folder and its trust cannot change
    error: str | None  # why the last reload of the folder failed (the trust before is kept)
    keys: tuple[TrustedKeyInfo, ...]


@dataclass(frozen=True, slots=True)
class KeyToTrust:
    public_key: bytes  # raw 32 bytes
    scope: tuple[str, ...] | None = None  # None: any AOR
    name: str | None = None  # NAME.pub in the trust folder


@dataclass(frozen=True, slots=True)
class KeyEndorsement:
    """An endorsement of a rotated key, as written by ``p2psip keygen --rotate``."""

    old_key_id: str
    new_key_id: str
    new_public_key: str  # base64
    signature: str  # base64


LatencyObserver = Callable[[str, float, bool], None]  # ("put" | "get", seconds, ok)


class AdminServices(Protocol):
    """Everything the admin API does, in the site's terms."""

    @property
    def token(self) -> str:
        """The bearer token every route but /health and /ready asks for."""
        ...

    @property
    def realm(self) -> str:
        """The digest realm users' HA1s are computed for."""
        ...

    def now(self) -> float:
        """The site's wall clock (binding expiry times are on it)."""
        ...

    async def readiness(self) -> Sequence[Check]: ...

    def normalize_aor(self, text: str) -> str:
        """``alice@example.com`` -> ``sip:alice@example.com``; InvalidInput if not an AOR."""
        ...

    async def registrations(
        self, prefix: str, after: str | None, limit: int
    ) -> RegistrationPage: ...

    async def registration(self, aor: str) -> Registration: ...

    async def dht_view(self, aor: str) -> DhtView: ...

    async def remove_registration(self, aor: str, contact: str | None = None) -> int:
        """Bindings removed, here and (with tombstones) in the DHT; NotFound if none."""
        ...

    def users(self) -> Sequence[UserRecord]: ...

    def user(self, username: str) -> UserRecord | None: ...

    async def save_user(self, change: UserChange) -> tuple[UserRecord, bool]:
        """The stored record and whether it is new."""
        ...

    async def delete_user(self, username: str) -> bool: ...

    async def dht_info(self) -> DhtInfo: ...

    async def dht_lookup(self, aor: str) -> Lookup: ...

    def sites(self) -> Sequence[MemberSite]:
        """The member sites this site has heard of, with whether they answer."""
        ...

    async def stats(self) -> SiteStats: ...

    def watch_dht_latency(self, observer: LatencyObserver) -> None:
        """Call ``observer`` after every DHT put and get of the site."""
        ...

    def trust(self) -> Trust:
        """The keys this site trusts now."""
        ...

    async def trust_key(self, key: KeyToTrust) -> tuple[TrustedKeyInfo, bool]:
        """Trust a key (written into the trust folder); and whether it is newly trusted.
        Conflict without a trust folder or when the name holds another key."""
        ...

    async def trust_endorsed_key(self, endorsement: KeyEndorsement) -> tuple[TrustedKeyInfo, bool]:
        """Trust a rotated key its trusted predecessor endorses. Conflict if the signer is
        not trusted here; Forbidden if the endorsement does not verify."""
        ...

    async def distrust_key(self, key_id: str) -> None:
        """Stop trusting a key (and the keys it endorsed). NotFound if not trusted;
        Conflict for the site's own key or without a trust folder."""
        ...
