"""HTTP Digest authentication for SIP (RFC 3261 §22, RFC 2617, RFC 7616 / RFC 8760), sans-IO.

The server side only: :class:`DigestAuthenticator` builds challenges for 401/407
responses and checks the credentials in a request. It reads no clock and draws no
random numbers: ``now`` is passed in, and nonces are *stateless*, a timestamp plus an
HMAC of it under a configured secret, so any instance (or a restarted one) sharing the
secret and the realm accepts them until they expire. For that to survive a restart,
``now`` must be wall-clock time (``time.time()``), not a monotonic clock.

Typical use by the registrar or proxy (``extra`` is passed to ``make_response``)::

    result = auth.verify(req, now, users.get, proxy=False)
    if result.status is AuthStatus.OK:
        ...                                   # result.username is authenticated
    elif result.status is AuthStatus.MALFORMED:
        make_response(req, 400)
    elif result.status is AuthStatus.FAILED:
        make_response(req, 403)               # see AuthStatus.FAILED
    else:                                     # MISSING or STALE
        stale = result.status is AuthStatus.STALE
        make_response(req, 401, extra=auth.challenge(now, proxy=False, stale=stale))

Credentials, HA1s and digests are never logged and never appear in a ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
import string
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from .errors import ParseError
from .grammar import TOKEN_CHARS, WS, quote, scan, scan_quoted, skip_ws, unquote
from .message import Request
from .uri import SipUri, parse_uri, unescape

MD5 = "MD5"
SHA256 = "SHA-256"
# algorithm name (upper case) -> (hashlib name, is a -sess variant). RFC 7616 §3.4.2:
# a -sess algorithm's HA1 is H(H(username:realm:password):nonce:cnonce).
_ALGORITHMS: dict[str, tuple[str, bool]] = {
    "MD5": ("md5", False),
    "MD5-SESS": ("md5", True),
    "SHA-256": ("sha256", False),
    "SHA-256-SESS": ("sha256", True),
}
_HEX_LEN = {"md5": 32, "sha256": 64}
_HEX = frozenset(string.hexdigits)
# Accepted nonces whose HMAC timestamp lies this far in the future (another instance
# sharing the secret whose clock runs slightly ahead).
_MAX_CLOCK_SKEW = 5.0


def _bytes(text: str) -> bytes:
    # Header values are str decoded from UTF-8; "surrogatepass" keeps this total for any
    # str a caller may build (a lone surrogate must not raise UnicodeEncodeError).
    return text.encode("utf-8", "surrogatepass")


def _h(hash_name: str, text: str) -> str:
    return hashlib.new(hash_name, _bytes(text)).hexdigest()


def ha1(username: str, realm: str, password: str, algorithm: str = MD5) -> str:
    """The hex HA1 = H(username:realm:password) for ``algorithm`` (MD5 or SHA-256)."""
    hash_name = _hash_name(algorithm)
    if hash_name is None or _ALGORITHMS[algorithm.upper()][1]:
        raise ValueError(f"unsupported digest algorithm {algorithm!r} (use MD5 or SHA-256)")
    return _h(hash_name, f"{username}:{realm}:{password}")


def _hash_name(algorithm: str) -> str | None:
    entry = _ALGORITHMS.get(algorithm.upper())
    return None if entry is None else entry[0]


def digest_response(
    *,
    algorithm: str,
    ha1_hex: str,
    nonce: str,
    method: str,
    uri: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
    body: bytes = b"",
) -> str:
    """The request-digest of RFC 2617 §3.2.2.1 / RFC 7616 §3.4.1, in lower-case hex.

    ``ha1_hex`` is the plain H(username:realm:password); the -sess variants derive
    their session HA1 here. ``qop`` None is RFC 2069 compatibility (no cnonce/nc).
    Raises ``ValueError`` for an algorithm or qop this module does not implement.
    """
    entry = _ALGORITHMS.get(algorithm.upper())
    if entry is None:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    hash_name, sess = entry
    if qop is not None and (nc is None or cnonce is None):
        raise ValueError("qop needs nc and cnonce")
    if sess:
        if cnonce is None:
            raise ValueError(f"{algorithm} needs a cnonce")
        ha1_hex = _h(hash_name, f"{ha1_hex}:{nonce}:{cnonce}")
    if qop is None or qop.lower() == "auth":
        a2 = f"{method}:{uri}"
    elif qop.lower() == "auth-int":
        a2 = f"{method}:{uri}:{hashlib.new(hash_name, body).hexdigest()}"
    else:
        raise ValueError(f"unsupported qop {qop!r}")
    ha2 = _h(hash_name, a2)
    if qop is None:
        return _h(hash_name, f"{ha1_hex}:{nonce}:{ha2}")
    return _h(hash_name, f"{ha1_hex}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


# --- users and results ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user's digest secrets for one realm. HA1s are password-equivalent: no repr."""

    username: str
    ha1_md5: str | None = field(default=None, repr=False)
    ha1_sha256: str | None = field(default=None, repr=False)

    def ha1_for(self, algorithm: str) -> str | None:
        """The stored HA1 that ``algorithm`` (or its -sess variant) uses, if any."""
        hash_name = _hash_name(algorithm)
        if hash_name == "md5":
            return self.ha1_md5
        if hash_name == "sha256":
            return self.ha1_sha256
        return None

    @classmethod
    def from_password(cls, username: str, realm: str, password: str) -> UserRecord:
        """Both HA1s computed; the password itself is not kept."""
        return cls(
            username,
            ha1(username, realm, password, MD5),
            ha1(username, realm, password, SHA256),
        )


class AuthStatus(Enum):
    OK = "ok"
    # No credentials for our realm that we can use (none at all, another realm, an
    # unknown scheme such as RFC 4475 §3.3.7's NoOneKnowsThisScheme, or an
    # algorithm/qop we do not implement): answer with a challenge.
    MISSING = "missing"
    # The digest is right but the nonce is expired, not ours (secret or realm changed)
    # or its nonce-count was replayed: challenge again with stale=true (RFC 2617 §3.2.1),
    # so the UA retries without asking its user for the password.
    STALE = "stale"
    # Unknown user, no HA1 for the chosen algorithm, or a wrong response: the caller
    # answers 403 Forbidden. Re-challenging would only make the UA resend the same
    # wrong password; the answer is the same for an unknown user and a wrong password,
    # so it reveals neither.
    FAILED = "failed"
    # A syntactically broken Digest credential, missing directives, or a digest-uri that
    # does not match the Request-URI (RFC 2617 §3.2.2.5): answer 400 Bad Request.
    MALFORMED = "malformed"


@dataclass(frozen=True, slots=True)
class AuthResult:
    status: AuthStatus
    username: str | None = None
    # Why, for debug logs; never contains credentials or digests.
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status is AuthStatus.OK


# --- parsing credentials ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    """One ``Digest`` credential: directive names lower-cased, values unquoted."""

    scheme: str
    params: tuple[tuple[str, str], ...] = field(repr=False)

    def get(self, name: str) -> str | None:
        for k, v in self.params:
            if k == name:
                return v
        return None


# Unquoted values are tokens in RFC 7616, but UAs send things like uri=sip:a@b;x=y
# and nc=00000001 unquoted; take anything up to the next comma or whitespace.
_VALUE_STOP = frozenset(WS + ',"')


def _scan_value(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] not in _VALUE_STOP:
        i += 1
    return i


def parse_credentials(value: str) -> list[Credentials]:
    """The Digest credentials in one Authorization / Proxy-Authorization header value.

    ``credentials = ("Digest" LWS digest-response) / other-response`` (RFC 3261 §25.1).
    Other schemes are ignored (an empty list), as RFC 4475 §3.3.7 requires. One
    header line normally holds one credential; if a comma is followed by a new scheme
    (``token LWS token``) a further credential starts there. Raises :class:`ParseError`
    for a malformed Digest credential, and nothing else.
    """
    out: list[Credentials] = []
    s = value
    n = len(s)
    i = skip_ws(s, 0)
    while True:
        j = scan(s, i, TOKEN_CHARS)
        if j == i:
            raise ParseError("malformed credentials: no auth-scheme")
        scheme = s[i:j]
        if scheme.lower() != "digest":
            # other-response: we cannot know its syntax (token68, for example), so the
            # rest of the line is skipped.
            return out
        if j >= n or s[j] not in WS:
            raise ParseError("malformed Digest credentials: no directives")
        params, i, next_scheme = _parse_directives(s, skip_ws(s, j))
        out.append(Credentials("Digest", params))
        if not next_scheme:
            return out


def _parse_directives(s: str, i: int) -> tuple[tuple[tuple[str, str], ...], int, bool]:
    """Parse ``auth-param *(COMMA auth-param)`` from ``s[i:]``.

    Returns the directives, the index where parsing stopped, and whether it stopped at
    the start of another credential (after a comma, a token followed by LWS and not "=").
    """
    n = len(s)
    params: list[tuple[str, str]] = []
    seen: set[str] = set()
    while True:
        j = scan(s, i, TOKEN_CHARS)
        if j == i:
            raise ParseError("malformed Digest directive name")
        name = s[i:j].lower()
        k = skip_ws(s, j)
        if k >= n or s[k] != "=":
            if params and k > j and k < n and s[k] in TOKEN_CHARS:
                return tuple(params), i, True  # "..., Digest username=..." or similar
            raise ParseError(f"Digest directive {name[:20]!r} without a value")
        k = skip_ws(s, k + 1)
        if k < n and s[k] == '"':
            end = scan_quoted(s, k)
            val = unquote(s[k:end])
        else:
            end = _scan_value(s, k)
            if end == k:
                raise ParseError(f"Digest directive {name[:20]!r} has an empty value")
            val = s[k:end]
        if name in seen:
            raise ParseError(f"duplicate Digest directive {name[:20]!r}")
        seen.add(name)
        params.append((name, val))
        i = skip_ws(s, end)
        if i >= n:
            return tuple(params), i, False
        if s[i] != ",":
            raise ParseError("junk after a Digest directive")
        # Tolerate empty list elements ("a=1, , b=2"), as RFC 7230 §7 #rule does.
        while i < n and (s[i] == "," or s[i] in WS):
            i += 1
        if i >= n:
            return tuple(params), i, False


# --- the authenticator -----------------------------------------------------------------

_REQUIRED = ("username", "realm", "nonce", "uri", "response")


class DigestAuthenticator:
    """Challenges and verifies Digest credentials for one realm.

    ``algorithms`` are offered in this order, the preferred first (RFC 8760 §2.4). The
    default prefers SHA-256; note that some UAs (SIPp 3.6 among them) only read the
    first challenge and know nothing but MD5, so deployments serving such UAs list MD5
    first. ``replay_cache`` bounds the (nonce, cnonce) -> nonce-count table that rejects
    replayed qop=auth credentials (0 disables it); call :meth:`verify` once per request,
    after retransmissions are absorbed by the transaction layer, or a retransmission is
    taken for a replay (answered STALE, which costs the UA one more round trip).
    """

    def __init__(
        self,
        realm: str,
        secret: bytes,
        nonce_ttl: float = 300,
        *,
        algorithms: Sequence[str] = (SHA256, MD5),
        check_uri: bool = True,
        replay_cache: int = 4096,
    ) -> None:
        if not secret:
            raise ValueError("the nonce secret must not be empty")
        if nonce_ttl <= 0:
            raise ValueError("nonce_ttl must be positive")
        canonical = {a.upper(): a for a in (MD5, SHA256)}
        offered: list[str] = []
        for a in algorithms:
            name = canonical.get(a.upper())
            if name is None:
                raise ValueError(f"cannot offer digest algorithm {a!r} (use MD5 or SHA-256)")
            if name not in offered:
                offered.append(name)
        if not offered:
            raise ValueError("at least one digest algorithm must be offered")
        self.realm = realm
        self.nonce_ttl = nonce_ttl
        self.algorithms = tuple(offered)
        self.check_uri = check_uri
        self._secret = secret
        self._replay_cache = replay_cache
        self._nonce_counts: OrderedDict[tuple[str, str], int] = OrderedDict()

    def __repr__(self) -> str:
        return f"<DigestAuthenticator realm={self.realm!r} algorithms={self.algorithms}>"

    # -- nonces ---------------------------------------------------------------------------

    def _mac(self, ts_hex: str) -> str:
        msg = _bytes(f"{ts_hex}:{self.realm}")
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:32]

    def make_nonce(self, now: float) -> str:
        """``<hex seconds>.<HMAC-SHA256(secret, seconds:realm), 128 bits>``."""
        if now < 0:
            raise ValueError("now must be a non-negative time in seconds")
        ts_hex = f"{int(now):x}"
        return f"{ts_hex}.{self._mac(ts_hex)}"

    def _nonce_problem(self, nonce: str, now: float) -> str | None:
        """Why the nonce is not acceptable now, or None when it is ours and fresh."""
        ts_hex, dot, mac = nonce.partition(".")
        if not dot or not ts_hex or len(ts_hex) > 16 or not _HEX.issuperset(ts_hex):
            return "not our nonce"
        if not hmac.compare_digest(_bytes(mac), _bytes(self._mac(ts_hex))):
            return "not our nonce"
        age = now - int(ts_hex, 16)
        if age > self.nonce_ttl:
            return "nonce expired"
        if age < -_MAX_CLOCK_SKEW:
            return "nonce from the future"
        return None

    # -- challenges -----------------------------------------------------------------------

    def challenge(
        self,
        now: float,
        *,
        proxy: bool,
        stale: bool = False,
        algorithms: Sequence[str] | None = None,
    ) -> list[tuple[str, str]]:
        """Header fields for a 401 (``WWW-Authenticate``) or 407 (``Proxy-Authenticate``).

        One challenge per offered algorithm, the preferred first (RFC 8760 §2.4), all
        with the same nonce. ``algorithms`` overrides the configured ones for this
        challenge (e.g. MD5 only for a user whose file entry has only ``ha1_md5``).
        """
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        nonce = self.make_nonce(now)
        offered = self.algorithms
        if algorithms is not None:
            wanted = {a.upper() for a in algorithms}
            offered = tuple(a for a in self.algorithms if a.upper() in wanted)
            if not offered:
                raise ValueError("none of the requested algorithms is configured")
        out: list[tuple[str, str]] = []
        for algorithm in offered:
            value = (
                f"Digest realm={quote(self.realm)}, nonce={quote(nonce)}, "
                f'algorithm={algorithm}, qop="auth"'
            )
            if stale:
                value += ", stale=true"
            out.append((name, value))
        return out

    # -- verification ---------------------------------------------------------------------

    def verify(
        self,
        request: Request,
        now: float,
        lookup: Callable[[str], UserRecord | None],
        *,
        proxy: bool,
    ) -> AuthResult:
        """Check the request's ``Authorization`` (``Proxy-Authorization`` if ``proxy``).

        Never raises for anything the peer sent; see :class:`AuthStatus` for what each
        result asks the caller to answer. ``lookup`` maps a username to its record.
        """
        header = "Proxy-Authorization" if proxy else "Authorization"
        lines = request.headers.get_all(header)
        if not lines:
            return AuthResult(AuthStatus.MISSING, reason=f"no {header}")
        ours: list[Credentials] = []
        broken: str | None = None
        for line in lines:
            try:
                creds = parse_credentials(line)
            except ParseError as exc:
                broken = str(exc)
                continue
            ours.extend(c for c in creds if c.get("realm") == self.realm)
        if not ours:
            # A broken line may have been meant for us; we cannot tell its realm.
            if broken is not None:
                return AuthResult(AuthStatus.MALFORMED, reason=broken)
            return AuthResult(AuthStatus.MISSING, reason=f"no Digest {header} for our realm")
        usable = [c for c in ours if _ALGORITHMS.get((c.get("algorithm") or MD5).upper())]
        if not usable:
            return AuthResult(AuthStatus.MISSING, reason="unsupported digest algorithm")
        return self._verify_one(request, now, lookup, usable[0])

    def _verify_one(
        self,
        request: Request,
        now: float,
        lookup: Callable[[str], UserRecord | None],
        creds: Credentials,
    ) -> AuthResult:
        missing = [d for d in _REQUIRED if creds.get(d) is None]
        if missing:
            return AuthResult(AuthStatus.MALFORMED, reason=f"no {missing[0]} directive")
        username = creds.get("username") or ""
        nonce = creds.get("nonce") or ""
        uri = creds.get("uri") or ""
        response = creds.get("response") or ""
        algorithm = creds.get("algorithm") or MD5
        hash_name, sess = _ALGORITHMS[algorithm.upper()]
        qop = creds.get("qop")
        nc = creds.get("nc")
        cnonce = creds.get("cnonce")
        if qop is not None:
            if qop.lower() not in ("auth", "auth-int"):
                # We only offer "auth"; a qop we cannot compute is no usable credential.
                return AuthResult(AuthStatus.MISSING, username, f"unsupported qop {qop[:20]!r}")
            if nc is None or cnonce is None:
                return AuthResult(AuthStatus.MALFORMED, username, "qop without nc or cnonce")
            if len(nc) != 8 or not _HEX.issuperset(nc):
                return AuthResult(AuthStatus.MALFORMED, username, "nc is not 8 hex digits")
        elif sess:
            return AuthResult(AuthStatus.MALFORMED, username, f"{algorithm} without qop")
        else:
            nc = cnonce = None  # RFC 2069 mode: they take no part in the digest
        if self.check_uri and not _same_uri(uri, request.uri):
            return AuthResult(AuthStatus.MALFORMED, username, "digest-uri is not the Request-URI")

        user = lookup(username)
        stored = user.ha1_for(algorithm) if user is not None else None
        # An unknown user (or one without this algorithm's HA1) costs the same digest as
        # a wrong password and gets the same answer: neither may tell a guesser which
        # usernames exist (timing included).
        ha1_hex = stored.lower() if stored is not None else self._decoy_ha1(username, hash_name)
        expected = digest_response(
            algorithm=algorithm,
            ha1_hex=ha1_hex,
            nonce=nonce,
            method=request.method,
            uri=uri,
            qop=qop,
            nc=nc,
            cnonce=cnonce,
            body=request.body,
        )
        given = response.lower()
        matches = len(given) == _HEX_LEN[hash_name] and hmac.compare_digest(
            _bytes(given), _bytes(expected)
        )
        if user is None:
            return AuthResult(AuthStatus.FAILED, username, "unknown user")
        if stored is None:
            return AuthResult(AuthStatus.FAILED, username, f"no {algorithm} HA1 for the user")
        if not matches:
            return AuthResult(AuthStatus.FAILED, username, "wrong response")

        # RFC 2617 §3.2.1: stale only when the digest is right for the nonce it names.
        problem = self._nonce_problem(nonce, now)
        if problem is not None:
            return AuthResult(AuthStatus.STALE, username, problem)
        if nc is not None and cnonce is not None and self._replayed(nonce, cnonce, int(nc, 16)):
            return AuthResult(AuthStatus.STALE, username, "nonce-count replayed")
        return AuthResult(AuthStatus.OK, username)

    def _decoy_ha1(self, username: str, hash_name: str) -> str:
        """A stand-in HA1 for a user we do not have: stable, secret, of the right size."""
        decoy = hmac.new(self._secret, _bytes(f"decoy:{username}:{self.realm}"), hash_name)
        return decoy.hexdigest()[: _HEX_LEN[hash_name]]

    def _replayed(self, nonce: str, cnonce: str, count: int) -> bool:
        """Record ``count`` for (nonce, cnonce); True if it does not exceed the last one.

        RFC 2617 §3.2.2: a repeated nc-value means a replay. Only exact replays matter
        (a changed nc or cnonce changes the digest), so the key includes the cnonce.
        """
        if self._replay_cache <= 0:
            return False
        key = (nonce, cnonce)
        last = self._nonce_counts.get(key)
        if last is not None and count <= last:
            return True
        self._nonce_counts[key] = count
        self._nonce_counts.move_to_end(key)
        while len(self._nonce_counts) > self._replay_cache:
            self._nonce_counts.popitem(last=False)
        return False


def _same_uri(digest_uri: str, request_uri: str) -> bool:
    """Whether the digest-uri names the Request-URI (RFC 2617 §3.2.2.5).

    Exact text, or SIP URIs with the same scheme, user, host and port: UAs differ in
    how they write parameters and the case of the host.
    """
    if digest_uri == request_uri:
        return True
    try:
        a = parse_uri(digest_uri)
        b = parse_uri(request_uri)
    except ParseError:
        return False
    if isinstance(a, SipUri) and isinstance(b, SipUri):
        return (
            a.scheme == b.scheme
            and (a.user is None) == (b.user is None)
            and unescape(a.user or "") == unescape(b.user or "")
            and a.host.lower() == b.host.lower()
            and a.port == b.port
        )
    return a == b


__all__ = [
    "MD5",
    "SHA256",
    "AuthResult",
    "AuthStatus",
    "Credentials",
    "DigestAuthenticator",
    "UserRecord",
    "digest_response",
    "ha1",
    "parse_credentials",
]
