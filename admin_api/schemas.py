"""Request and response models of the admin API (pydantic; the OpenAPI schema).

Inputs are described exactly as they are checked: a request the schema allows is never
refused for its shape, and one it forbids always gets a 4xx with a JSON message.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

# A SIP user part this site lets an admin create (RFC 3261 §25.1 unreserved characters,
# starting with a letter or digit, so it never reads as a path segment like "..").
USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._~+-]{0,63}$"
MD5_PATTERN = r"^[0-9A-Fa-f]{32}$"
SHA256_PATTERN = r"^[0-9A-Fa-f]{64}$"
# An address of record: [sip:]user@host, the host a DNS name or an IPv4 address. This is a
# subset of what the SIP parser takes (no %-escapes: in a URL path they would be decoded
# before the pattern is checked), so that whatever the schema allows, the site accepts.
_USER = r"[A-Za-z0-9._~!*'()&=+$,-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_TOP = r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_HOST = rf"(?:{_LABEL}\.)*{_TOP}|(?:{_OCTET}\.){{3}}{_OCTET}"
AOR_PATTERN = rf"^(?:[sS][iI][pP][sS]?:)?{_USER}@(?:{_HOST})$"

Algorithm = Literal["MD5", "SHA-256"]
Responses = dict[int | str, dict[str, Any]]  # the ``responses=`` of a route


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- errors -------------------------------------------------------------------------------


class ErrorOut(Model):
    message: str = Field(description="what went wrong, one line")


class FieldErrorOut(Model):
    location: str = Field(description="where in the request, e.g. 'query.limit'")
    message: str


class ValidationErrorOut(Model):
    message: str
    errors: list[FieldErrorOut]


# --- health -------------------------------------------------------------------------------


class HealthOut(Model):
    status: Literal["ok"]


class CheckOut(Model):
    name: str = Field(description="sip, dht or redis")
    ok: bool
    detail: str


class ReadyOut(Model):
    ready: bool
    message: str
    checks: list[CheckOut]


# --- registrations ------------------------------------------------------------------------


class BindingOut(Model):
    contact: str
    expires_in: int = Field(description="seconds left")
    expires_at: float = Field(description="absolute expiry, Unix time")
    q: float
    source: str = Field(description="the flow the REGISTER came from, transport:host:port")
    call_id: str
    cseq: int
    instance: str | None = None
    reg_id: int | None = None
    path: list[str] = Field(default_factory=list)
    registered_at: float


class DhtBindingOut(Model):
    contact: str
    home: str = Field(description="SIP URI of the proxy the phone registered with")
    site: str = Field(description="the site that registered (and signed) the binding")
    key_id: str = Field(description="id of the site key that signed it")
    expires_in: int
    expires_at: float
    q: float
    version: int
    instance: str | None = None
    reg_id: int | None = None


class RegistrationOut(Model):
    aor: str
    bindings: list[BindingOut]


class DhtViewOut(Model):
    bindings: list[DhtBindingOut] = Field(description="live, signature-checked bindings")
    error: str | None = Field(default=None, description="why the DHT could not be asked, if so")


class RegistrationDetailOut(RegistrationOut):
    dht: DhtViewOut | None = Field(default=None, description="only with ?dht=true")


class RegistrationPageOut(Model):
    items: list[RegistrationOut]
    next_after: str | None = Field(
        description="pass as ?after= for the next page; null on the last page"
    )


class RemovedOut(Model):
    aor: str
    removed: int = Field(description="bindings removed, here and in the DHT")


# --- users --------------------------------------------------------------------------------


class UserOut(Model):
    username: str
    realm: str
    algorithms: list[Algorithm] = Field(description="digest algorithms the user has an HA1 for")


class UserListOut(Model):
    users: list[UserOut]


Password = Annotated[str, Field(min_length=1, max_length=256, description="hashed at once")]
Username = Annotated[str, Field(pattern=USERNAME_PATTERN, examples=["alice"])]


class PasswordSecret(Model):
    password: Password


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # "null" is no value the schema allows


# Either HA1 may be left out, but not both; an explicit null is refused, as the schema says.
_ONE_HA1: dict[str, Any] = {
    "anyOf": [{"required": ["ha1_md5"]}, {"required": ["ha1_sha256"]}],
}


class Ha1Secret(Model):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_ONE_HA1)

    ha1_md5: Annotated[str, Field(pattern=MD5_PATTERN)] | SkipJsonSchema[None] = Field(
        default=None,
        description="MD5(username:realm:password), hex",
        json_schema_extra=_no_default,
    )
    ha1_sha256: Annotated[str, Field(pattern=SHA256_PATTERN)] | SkipJsonSchema[None] = Field(
        default=None,
        description="SHA-256(username:realm:password), hex",
        json_schema_extra=_no_default,
    )

    @field_validator("ha1_md5", "ha1_sha256", mode="before")
    @classmethod
    def refuse_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("must be a string")
        return value

    @model_validator(mode="after")
    def one_ha1(self) -> Ha1Secret:
        if self.ha1_md5 is None and self.ha1_sha256 is None:
            raise ValueError("give password, ha1_md5 or ha1_sha256")
        return self


class NewUserWithPassword(PasswordSecret):
    username: Username


class NewUserWithHa1(Ha1Secret):
    username: Username


def _secret_kind(value: object) -> str:
    """Which kind of secret a body holds, so that errors name only that kind's fields."""
    if isinstance(value, dict):
        return "password" if "password" in value else "ha1"
    return "password" if isinstance(value, PasswordSecret) else "ha1"


# Exactly one of the two shapes (additionalProperties is false in both): "oneOf".
UserSecret = Annotated[
    Annotated[PasswordSecret, Tag("password")] | Annotated[Ha1Secret, Tag("ha1")],
    Discriminator(_secret_kind),
]
NewUser = Annotated[
    Annotated[NewUserWithPassword, Tag("password")] | Annotated[NewUserWithHa1, Tag("ha1")],
    Discriminator(_secret_kind),
]


# --- the DHT ------------------------------------------------------------------------------


class PeerOut(Model):
    node_id: str
    host: str
    port: int


class DhtInfoOut(Model):
    node_id: str = Field(description="160-bit Kademlia id, hex")
    host: str
    port: int
    site_id: str
    home: str
    key_id: str
    peer_count: int
    peers: list[PeerOut]
    stored_records: int = Field(description="DHT records (AORs) this node stores")


class SiteOut(Model):
    site_id: str = Field(description="the site's name, as its bindings say")
    home: str = Field(description="its home proxy, where calls to its users go")
    key_id: str = Field(description="the key its bindings are signed with")
    reachable: bool | None = Field(description="answers now (null: not asked yet)")
    last_heard: float | None = Field(description="Unix time of its last answer")
    rtt_ms: float | None = Field(description="round-trip time of its last answer")
    bindings_seen: int = Field(description="its live bindings seen in lookups here")


class SitesOut(Model):
    sites: list[SiteOut]


class LookupOut(Model):
    aor: str
    latency_ms: float
    bindings: list[DhtBindingOut] = Field(description="live, signature-checked bindings")
    rejected: int = Field(description="bindings in the answers that failed verification")


# --- trust between sites ------------------------------------------------------------------

# What the site checks (dht_adaptor.trust_folder.SCOPE_PATTERN; a test holds them equal): a
# domain (maybe a glob, *.example.com) or an AOR glob, sip:*@example.com.
_HOST_GLOB = r"[A-Za-z0-9*?][A-Za-z0-9.*?-]{0,252}"
_USER_GLOB = r"[A-Za-z0-9._~!*?'()&=+$,;/%-]{1,128}"
SCOPE_PATTERN = rf"^(?:(?:[sS][iI][pP][sS]?:)?{_USER_GLOB}@)?{_HOST_GLOB}$"
KEY_ID_PATTERN = r"^[0-9a-f]{16}$"
RAW_KEY_PATTERN = r"^[A-Za-z0-9+/]{43}=$"  # base64 of 32 bytes
SIGNATURE_PATTERN = r"^[A-Za-z0-9+/]{86}==$"  # base64 of 64 bytes
# A site.pub as it is: PEM SubjectPublicKeyInfo of an Ed25519 key (its DER has a fixed
# 12-byte head, "MCowBQYDK2VwAyEA" in base64), or the raw key in base64.
_PEM_KEY = (
    r"-----BEGIN PUBLIC KEY-----\s*MCowBQYDK2VwAyEA[A-Za-z0-9+/]{43}=\s*-----END PUBLIC KEY-----\s*"
)
PUBLIC_KEY_PATTERN = rf"^(?:[A-Za-z0-9+/]{{43}}=|{_PEM_KEY})$"
KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"

ScopePattern = Annotated[str, Field(pattern=SCOPE_PATTERN, examples=["example.com"])]


class TrustedKeyOut(Model):
    key_id: str = Field(description="16 hex digits of sha256 over the raw public key")
    public_key: str = Field(description="the raw 32-byte Ed25519 key, base64")
    own: bool = Field(description="this site's own key (cannot be removed)")
    file: str | None = Field(description="the file in the trust folder that trusts it")
    endorsed_by: str | None = Field(description="the key id whose endorsement trusts it")
    scope: list[str] | None = Field(
        description="the domains and AOR globs it may publish bindings for; null: any AOR"
    )


class TrustOut(Model):
    folder: str | None = Field(description="the trust folder (--trust); null: none")
    error: str | None = Field(
        description="why the last reload of the folder failed (the trust before is kept)"
    )
    keys: list[TrustedKeyOut]


class NewTrustedKey(Model):
    public_key: Annotated[
        str,
        Field(
            pattern=PUBLIC_KEY_PATTERN,
            max_length=512,
            description="the site's site.pub (PEM), or its raw Ed25519 key in base64",
        ),
    ]
    scope: Annotated[list[ScopePattern], Field(max_length=256)] | None = Field(
        default=None,
        description="domains (example.com, *.example.com) or AOR globs (sip:*@example.com) "
        "it may publish bindings for; null or left out: any AOR",
    )
    name: Annotated[str, Field(pattern=KEY_NAME_PATTERN)] | None = Field(
        default=None,
        description="the file's name in the trust folder (NAME.pub, NAME.scope); "
        "default: the file that holds the key already, else its key id",
    )


class EndorsementBody(Model):
    """What ``p2psip keygen --rotate`` writes to OLDID-NEWID.endorsement."""

    v: Literal[1]
    old_key_id: Annotated[str, Field(pattern=KEY_ID_PATTERN)]
    new_key_id: Annotated[str, Field(pattern=KEY_ID_PATTERN)]
    new_public_key: Annotated[str, Field(pattern=RAW_KEY_PATTERN)]
    signature: Annotated[str, Field(pattern=SIGNATURE_PATTERN)]


class NewEndorsedKey(Model):
    endorsement: EndorsementBody


def _trust_kind(value: object) -> str:
    if isinstance(value, dict):
        return "endorsement" if "endorsement" in value else "key"
    return "endorsement" if isinstance(value, NewEndorsedKey) else "key"


# A key (and its scope), or a rotated key endorsed by a trusted one: "oneOf".
TrustRequest = Annotated[
    Annotated[NewTrustedKey, Tag("key")] | Annotated[NewEndorsedKey, Tag("endorsement")],
    Discriminator(_trust_kind),
]


# --- statistics ---------------------------------------------------------------------------


class SipStatsOut(Model):
    requests: dict[str, int] = Field(description="requests received, by method")
    responses_received: dict[str, int] = Field(description="by class: 1xx ... 6xx")
    responses_sent: dict[str, int]
    server_transactions: int
    client_transactions: int
    parse_errors: int


class RegistrarStatsOut(Model):
    aors: int | None = Field(description="AORs with live bindings (null: store unreadable)")
    bindings: int | None
    registers_ok: int
    auth_failures: int
    users: int


class CallStatsOut(Model):
    routed_local: int
    routed_dht: int
    dht_retries: int


class DhtStatsOut(Model):
    puts_ok: int
    puts_failed: int
    puts_skipped: int = Field(description="refreshes the DHT did not need yet")
    gets_ok: int
    gets_failed: int
    backlog: int = Field(description="records waiting to be written")
    lookups: int
    cache_hits: int
    cache_misses: int
    peers: int
    records_accepted: int
    records_rejected: int
    bindings_rejected_on_get: int
    rpc_timeouts: int


class StatsOut(Model):
    sip: SipStatsOut
    registrar: RegistrarStatsOut
    calls: CallStatsOut
    dht: DhtStatsOut
    counters: dict[str, float] = Field(description="every raw counter of the site")
