"""Digest authentication: known answers, the challenge/verify round trip, and fuzzing."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.sip.auth import (
    MD5,
    SHA256,
    AuthStatus,
    DigestAuthenticator,
    UserRecord,
    digest_response,
    ha1,
    parse_credentials,
)
from proxy.sip.errors import ParseError
from proxy.sip.grammar import quote, split_commas, unquote
from proxy.sip.headers import Headers
from proxy.sip.message import Request, make_response, parse_message

REALM = "example.com"
SECRET = b"k" * 32
T0 = 1_700_000_000.0
RURI = "sip:example.com"


def users() -> dict[str, UserRecord]:
    return {
        "alice": UserRecord.from_password("alice", REALM, "wonderland"),
        "md5only": UserRecord("md5only", ha1("md5only", REALM, "pw", MD5), None),
    }


def lookup(name: str) -> UserRecord | None:
    return users().get(name)


def register(*auth: tuple[str, str], uri: str = RURI, method: str = "REGISTER") -> Request:
    headers = Headers.of(
        ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK776asdhds"),
        ("Max-Forwards", "70"),
        ("To", "<sip:alice@example.com>"),
        ("From", "<sip:alice@example.com>;tag=1928301774"),
        ("Call-ID", "a84b4c76e66710"),
        ("CSeq", f"2 {method}"),
        ("Contact", "<sip:alice@192.0.2.1>"),
        *auth,
    )
    return Request(method, uri, headers)


def parse_challenge(value: str) -> dict[str, str]:
    scheme, _, rest = value.partition(" ")
    assert scheme == "Digest"
    out = {}
    for item in split_commas(rest):
        k, _, v = item.partition("=")
        out[k.strip()] = unquote(v.strip())
    return out


def answer(
    challenge: str,
    *,
    username: str = "alice",
    password: str = "wonderland",
    method: str = "REGISTER",
    uri: str = RURI,
    cnonce: str = "0a4f113b",
    nc: int = 1,
) -> str:
    """A tiny UAC: the Authorization value answering one challenge, with qop=auth."""
    c = parse_challenge(challenge)
    algorithm = c["algorithm"]
    h = hashlib.md5 if algorithm.upper().startswith("MD5") else hashlib.sha256

    def hx(s: str) -> str:
        return h(s.encode()).hexdigest()

    a1 = hx(f"{username}:{c['realm']}:{password}")
    if algorithm.upper().endswith("-SESS"):
        a1 = hx(f"{a1}:{c['nonce']}:{cnonce}")
    a2 = hx(f"{method}:{uri}")
    ncv = f"{nc:08x}"
    response = hx(f"{a1}:{c['nonce']}:{ncv}:{cnonce}:auth:{a2}")
    return (
        f"Digest username={quote(username)}, realm={quote(c['realm'])}, "
        f"nonce={quote(c['nonce'])}, uri={quote(uri)}, response={quote(response)}, "
        f"algorithm={algorithm}, cnonce={quote(cnonce)}, qop=auth, nc={ncv}"
    )


def auth(**kw: Any) -> DigestAuthenticator:
    return DigestAuthenticator(REALM, SECRET, **kw)


# --- known answers ---------------------------------------------------------------------


def test_rfc2617_known_answer() -> None:
    # RFC 2617 §3.5.
    h = ha1("Mufasa", "testrealm@host.com", "Circle Of Life", MD5)
    assert h == hashlib.md5(b"Mufasa:testrealm@host.com:Circle Of Life").hexdigest()
    got = digest_response(
        algorithm="MD5",
        ha1_hex=h,
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093",
        method="GET",
        uri="/dir/index.html",
        qop="auth",
        nc="00000001",
        cnonce="0a4f113b",
    )
    assert got == "6629fae49393a05397450978507c4ef1"


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        # RFC 7616 §3.9.1 (the algorithms RFC 8760 brings to SIP).
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_known_answers(algorithm: str, expected: str) -> None:
    got = digest_response(
        algorithm=algorithm,
        ha1_hex=ha1("Mufasa", "http-auth@example.org", "Circle of Life", algorithm),
        nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
        method="GET",
        uri="/dir/index.html",
        qop="auth",
        nc="00000001",
        cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
    )
    assert got == expected


def test_rfc2069_mode_digest() -> None:
    h = ha1("u", "r", "p")
    ha2 = hashlib.md5(b"REGISTER:sip:r").hexdigest()
    want = hashlib.md5(f"{h}:n:{ha2}".encode()).hexdigest()
    got = digest_response(algorithm="md5", ha1_hex=h, nonce="n", method="REGISTER", uri="sip:r")
    assert got == want


def test_ha1_rejects_unknown_algorithms() -> None:
    with pytest.raises(ValueError):
        ha1("u", "r", "p", "SHA-512-256")
    with pytest.raises(ValueError):
        ha1("u", "r", "p", "MD5-sess")


def test_rfc7616_example_verifies_through_the_authenticator() -> None:
    # The RFC's own Authorization header, checked end to end (its nonce is not ours, so
    # the right digest comes back STALE: RFC 2617 §3.2.1).
    a = DigestAuthenticator("http-auth@example.org", SECRET, check_uri=True)
    value = (
        'Digest username="Mufasa", realm="http-auth@example.org", uri="/dir/index.html", '
        'algorithm=SHA-256, nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", '
        'nc=00000001, cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ", qop=auth, '
        'response="753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1", '
        'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"'
    )
    rec = UserRecord.from_password("Mufasa", "http-auth@example.org", "Circle of Life")
    req = Request("GET", "/dir/index.html", Headers.of(("Authorization", value)))
    result = a.verify(req, T0, {"Mufasa": rec}.get, proxy=False)
    assert result.status is AuthStatus.STALE
    assert result.username == "Mufasa"
    bad = UserRecord.from_password("Mufasa", "http-auth@example.org", "circle of life")
    assert a.verify(req, T0, {"Mufasa": bad}.get, proxy=False).status is AuthStatus.FAILED


# --- challenges ------------------------------------------------------------------------


def test_challenge_sha256_first_then_md5() -> None:
    pairs = auth().challenge(T0, proxy=False)
    assert [n for n, _ in pairs] == ["WWW-Authenticate", "WWW-Authenticate"]
    first, second = (parse_challenge(v) for _, v in pairs)
    assert first["algorithm"] == "SHA-256" and second["algorithm"] == "MD5"
    for c in (first, second):
        assert c["realm"] == REALM and c["qop"] == "auth" and "stale" not in c
    assert first["nonce"] == second["nonce"]


def test_challenge_for_proxy_with_stale() -> None:
    pairs = auth().challenge(T0, proxy=True, stale=True)
    assert {n for n, _ in pairs} == {"Proxy-Authenticate"}
    assert all(parse_challenge(v)["stale"] == "true" for _, v in pairs)
    resp = make_response(register(), 407, extra=pairs)
    assert resp.headers.count("Proxy-Authenticate") == 2


def test_challenge_algorithm_order_and_override() -> None:
    a = auth(algorithms=("md5", "sha-256"))
    assert a.algorithms == (MD5, SHA256)
    algs = [parse_challenge(v)["algorithm"] for _, v in a.challenge(T0, proxy=False)]
    assert algs == ["MD5", "SHA-256"]
    only = a.challenge(T0, proxy=False, algorithms=["MD5"])
    assert [parse_challenge(v)["algorithm"] for _, v in only] == ["MD5"]
    with pytest.raises(ValueError):
        a.challenge(T0, proxy=False, algorithms=["SHA-512-256"])
    with pytest.raises(ValueError):
        auth(algorithms=("SHA-512-256",))
    with pytest.raises(ValueError):
        auth(algorithms=())


def test_constructor_and_repr_keep_secrets() -> None:
    with pytest.raises(ValueError):
        DigestAuthenticator(REALM, b"")
    with pytest.raises(ValueError):
        DigestAuthenticator(REALM, SECRET, nonce_ttl=0)
    assert "kkkk" not in repr(auth())
    rec = users()["alice"]
    assert rec.ha1_md5 is not None and rec.ha1_md5 not in repr(rec)
    assert "wonderland" not in repr(rec)


def test_nonce_is_deterministic_and_needs_nonnegative_time() -> None:
    assert auth().make_nonce(T0) == auth().make_nonce(T0 + 0.5)
    assert auth().make_nonce(T0) != DigestAuthenticator(REALM, b"other").make_nonce(T0)
    with pytest.raises(ValueError):
        auth().make_nonce(-1)


# --- the round trip --------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1])
def test_challenge_answer_verify_ok(index: int) -> None:
    a = auth()
    challenge = a.challenge(T0, proxy=False)[index][1]
    req = register(("Authorization", answer(challenge)))
    result = a.verify(req, T0 + 10, lookup, proxy=False)
    assert result.status is AuthStatus.OK and result.ok
    assert result.username == "alice"


def test_round_trip_through_the_wire() -> None:
    a = auth()
    challenge = a.challenge(T0, proxy=False)[0][1]
    msg = parse_message(bytes(register(("Authorization", answer(challenge)))))
    assert isinstance(msg, Request)
    assert a.verify(msg, T0, lookup, proxy=False).ok


def test_restart_with_same_secret_accepts_recent_nonce() -> None:
    challenge = auth().challenge(T0, proxy=False)[0][1]
    req = register(("Authorization", answer(challenge)))
    assert auth().verify(req, T0 + 60, lookup, proxy=False).ok


@pytest.mark.parametrize("algorithm", ["MD5-sess", "SHA-256-sess"])
def test_sess_algorithms(algorithm: str) -> None:
    a = auth()
    nonce = a.make_nonce(T0)
    challenge = f'Digest realm="{REALM}", nonce="{nonce}", algorithm={algorithm}, qop="auth"'
    req = register(("Authorization", answer(challenge)))
    assert a.verify(req, T0, lookup, proxy=False).ok


def test_rfc2069_no_qop_is_accepted() -> None:
    a = auth()
    nonce = a.make_nonce(T0)
    h = users()["alice"].ha1_md5
    assert h is not None
    resp = digest_response(algorithm=MD5, ha1_hex=h, nonce=nonce, method="REGISTER", uri=RURI)
    value = (
        f'Digest username="alice", realm="{REALM}", nonce="{nonce}", uri="{RURI}", '
        f'response="{resp}"'
    )
    assert a.verify(register(("Authorization", value)), T0, lookup, proxy=False).ok


def test_proxy_authorization_vs_authorization() -> None:
    a = auth()
    www = answer(a.challenge(T0, proxy=False)[0][1])
    prx = answer(a.challenge(T0, proxy=True)[0][1], cnonce="b7e2")
    req_www = register(("Authorization", www))
    req_prx = register(("Proxy-Authorization", prx))
    assert a.verify(req_www, T0, lookup, proxy=False).ok
    assert a.verify(req_prx, T0, lookup, proxy=True).ok
    assert a.verify(req_www, T0, lookup, proxy=True).status is AuthStatus.MISSING
    assert a.verify(req_prx, T0, lookup, proxy=False).status is AuthStatus.MISSING


def test_picks_our_realm_among_several_credentials() -> None:
    a = auth()
    mine = answer(a.challenge(T0, proxy=True)[1][1])
    other = mine.replace(f'realm="{REALM}"', 'realm="other.example.net"')
    req = register(("Proxy-Authorization", other), ("Proxy-Authorization", mine))
    assert a.verify(req, T0, lookup, proxy=True).ok
    only_other = register(("Proxy-Authorization", other))
    assert a.verify(only_other, T0, lookup, proxy=True).status is AuthStatus.MISSING


def test_two_credentials_on_one_line() -> None:
    a = auth()
    mine = answer(a.challenge(T0, proxy=True)[0][1])
    other = mine.replace(f'realm="{REALM}"', 'realm="other.example.net"')
    creds = parse_credentials(f"{other}, {mine}")
    assert [c.get("realm") for c in creds] == ["other.example.net", REALM]
    req = register(("Proxy-Authorization", f"{other}, {mine}"))
    assert a.verify(req, T0, lookup, proxy=True).ok


# --- failures --------------------------------------------------------------------------


def test_wrong_password_fails() -> None:
    a = auth()
    challenge = a.challenge(T0, proxy=False)[0][1]
    req = register(("Authorization", answer(challenge, password="guess")))
    result = a.verify(req, T0, lookup, proxy=False)
    assert result.status is AuthStatus.FAILED and not result.ok
    assert result.username == "alice"


def test_unknown_user_fails() -> None:
    a = auth()
    challenge = a.challenge(T0, proxy=False)[0][1]
    req = register(("Authorization", answer(challenge, username="mallory")))
    assert a.verify(req, T0, lookup, proxy=False).status is AuthStatus.FAILED


def test_user_without_ha1_for_the_algorithm_fails() -> None:
    a = auth()
    sha, md5 = (v for _, v in a.challenge(T0, proxy=False))
    ok = register(("Authorization", answer(md5, username="md5only", password="pw")))
    assert a.verify(ok, T0, lookup, proxy=False).ok
    no = register(("Authorization", answer(sha, username="md5only", password="pw")))
    result = a.verify(no, T0, lookup, proxy=False)
    assert result.status is AuthStatus.FAILED and "SHA-256" in result.reason


def test_expired_nonce_is_stale() -> None:
    a = auth(nonce_ttl=300)
    challenge = a.challenge(T0, proxy=False)[0][1]
    req = register(("Authorization", answer(challenge)))
    assert a.verify(req, T0 + 300, lookup, proxy=False).ok
    assert a.verify(req, T0 + 301.5, lookup, proxy=False).status is AuthStatus.STALE
    # A nonce dated far in the future (clock gone backwards) is not accepted either.
    assert a.verify(req, T0 - 60, lookup, proxy=False).status is AuthStatus.STALE


def test_expired_nonce_with_wrong_password_is_failed_not_stale() -> None:
    # RFC 2617 §3.2.1: stale=true only when the digest itself is right.
    a = auth()
    challenge = a.challenge(T0, proxy=False)[0][1]
    req = register(("Authorization", answer(challenge, password="guess")))
    assert a.verify(req, T0 + 1000, lookup, proxy=False).status is AuthStatus.FAILED


@pytest.mark.parametrize(
    "nonce",
    [
        "6553f100.00000000000000000000000000000000",  # a forged MAC
        "deadbeef",  # no MAC at all
        "zz.0000",  # not hex
        "",
    ],
)
def test_forged_nonce_is_stale(nonce: str) -> None:
    a = auth()
    challenge = f'Digest realm="{REALM}", nonce="{nonce}", algorithm=MD5, qop="auth"'
    req = register(("Authorization", answer(challenge)))
    assert a.verify(req, T0, lookup, proxy=False).status is AuthStatus.STALE


def test_nonce_from_another_secret_or_realm_is_stale() -> None:
    other = DigestAuthenticator(REALM, b"another secret")
    challenge = other.challenge(T0, proxy=False)[0][1]
    req = register(("Authorization", answer(challenge)))
    assert auth().verify(req, T0, lookup, proxy=False).status is AuthStatus.STALE


def test_replayed_nonce_count_is_stale() -> None:
    a = auth()
    challenge = a.challenge(T0, proxy=False)[0][1]
    first = register(("Authorization", answer(challenge, nc=1)))
    assert a.verify(first, T0, lookup, proxy=False).ok
    assert a.verify(first, T0 + 1, lookup, proxy=False).status is AuthStatus.STALE
    second = register(("Authorization", answer(challenge, nc=2)))
    assert a.verify(second, T0 + 2, lookup, proxy=False).ok
    other_cnonce = register(("Authorization", answer(challenge, nc=1, cnonce="ffff")))
    assert a.verify(other_cnonce, T0 + 2, lookup, proxy=False).ok


def test_replay_cache_is_bounded_and_can_be_disabled() -> None:
    a = auth(replay_cache=2)
    challenge = a.challenge(T0, proxy=False)[0][1]
    reqs = [register(("Authorization", answer(challenge, cnonce=f"c{i}"))) for i in range(3)]
    for r in reqs:
        assert a.verify(r, T0, lookup, proxy=False).ok
    assert len(a._nonce_counts) == 2
    # The oldest entry was evicted, so its replay goes unnoticed (the bound's price).
    assert a.verify(reqs[0], T0, lookup, proxy=False).ok
    off = auth(replay_cache=0)
    assert off.verify(reqs[0], T0, lookup, proxy=False).ok
    assert off.verify(reqs[0], T0, lookup, proxy=False).ok


def test_missing_credentials() -> None:
    a = auth()
    result = a.verify(register(), T0, lookup, proxy=False)
    assert result.status is AuthStatus.MISSING and result.username is None


def test_rfc4475_unknown_scheme_is_missing_not_an_error() -> None:
    # RFC 4475 §3.3.7 (regaut01): a registrar that cares challenges it.
    data = (Path(__file__).parent.parent / "data" / "rfc4475" / "regaut01.dat").read_bytes()
    req = parse_message(data)
    assert isinstance(req, Request)
    assert parse_credentials(req.headers.get("Authorization") or "") == []
    assert auth().verify(req, T0, lookup, proxy=False).status is AuthStatus.MISSING


def test_basic_scheme_is_ignored() -> None:
    req = register(("Authorization", "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="))
    assert auth().verify(req, T0, lookup, proxy=False).status is AuthStatus.MISSING


def test_unknown_algorithm_is_missing() -> None:
    a = auth()
    nonce = a.make_nonce(T0)
    challenge = f'Digest realm="{REALM}", nonce="{nonce}", algorithm=SHA-512-256, qop="auth"'
    value = answer(challenge.replace("SHA-512-256", "SHA-256")).replace(
        "algorithm=SHA-256", "algorithm=SHA-512-256"
    )
    result = a.verify(register(("Authorization", value)), T0, lookup, proxy=False)
    assert result.status is AuthStatus.MISSING


def test_commas_inside_quoted_values() -> None:
    a = auth()
    challenge = a.challenge(T0, proxy=False)[1][1]
    name = 'o\'brien, "the" admin'
    users_ = {name: UserRecord.from_password(name, REALM, "pw")}
    value = answer(challenge, username=name, password="pw", cnonce="a,b=c, d")
    creds = parse_credentials(value)
    assert len(creds) == 1
    assert creds[0].get("username") == name and creds[0].get("cnonce") == "a,b=c, d"
    assert a.verify(register(("Authorization", value)), T0, users_.get, proxy=False).ok


def test_directive_names_are_case_insensitive_and_lws_tolerated() -> None:
    a = auth()
    value = answer(a.challenge(T0, proxy=False)[1][1])
    value = value.replace("username=", "UserName =  ").replace(", nonce=", " ,nonce= ")
    assert a.verify(register(("Authorization", value)), T0, lookup, proxy=False).ok


def test_uri_must_match_the_request_uri() -> None:
    a = auth()
    challenge = a.challenge(T0, proxy=False)[0][1]
    other = register(("Authorization", answer(challenge, uri="sip:elsewhere.example.net")))
    assert a.verify(other, T0, lookup, proxy=False).status is AuthStatus.MALFORMED
    # Same SIP URI written differently: host case and parameters.
    loose = register(("Authorization", answer(challenge, uri="sip:EXAMPLE.com;transport=tcp")))
    assert a.verify(loose, T0, lookup, proxy=False).ok
    unchecked = auth(check_uri=False)
    assert unchecked.verify(other, T0, lookup, proxy=False).ok


@pytest.mark.parametrize(
    "value",
    [
        "Digest",
        "Digest ",
        'Digest username="alice", realm="example.com"',  # no nonce, uri, response
        'Digest username="alice, realm="example.com"',  # unterminated quote
        'Digest username="alice" realm="example.com"',  # missing comma
        'Digest username="a", username="b", realm="example.com"',
        'Digest realm="example.com", username',
        'Digest realm="example.com", =x',
        'Digest realm="example.com", username=',
        "",
        "  ",
    ],
)
def test_malformed_digest(value: str) -> None:
    req = register(("Authorization", value))
    result = auth().verify(req, T0, lookup, proxy=False)
    assert result.status is AuthStatus.MALFORMED, result


@pytest.mark.parametrize(
    "change",
    [
        ("qop=auth, nc=00000001", "qop=auth"),  # qop without nc
        (', cnonce="0a4f113b"', ""),  # qop without cnonce
        ("nc=00000001", "nc=1"),
        ("nc=00000001", "nc=0000000g"),
    ],
)
def test_malformed_qop_directives(change: tuple[str, str]) -> None:
    a = auth()
    value = answer(a.challenge(T0, proxy=False)[1][1]).replace(*change)
    result = a.verify(register(("Authorization", value)), T0, lookup, proxy=False)
    assert result.status is AuthStatus.MALFORMED


def test_sess_without_qop_is_malformed_and_unknown_qop_missing() -> None:
    a = auth()
    nonce = a.make_nonce(T0)
    base = f'Digest username="alice", realm="{REALM}", nonce="{nonce}", uri="{RURI}"'
    sess = register(("Authorization", base + ', response="00", algorithm=MD5-sess'))
    assert a.verify(sess, T0, lookup, proxy=False).status is AuthStatus.MALFORMED
    odd = register(("Authorization", base + ', response="00", qop=auth-conf, nc=00000001'))
    assert a.verify(odd, T0, lookup, proxy=False).status is AuthStatus.MISSING


def test_response_of_wrong_length_or_case() -> None:
    a = auth()
    value = answer(a.challenge(T0, proxy=False)[1][1])
    resp = parse_credentials(value)[0].get("response") or ""
    upper = value.replace(resp, resp.upper())
    assert a.verify(register(("Authorization", upper)), T0, lookup, proxy=False).ok
    short = value.replace(resp, resp[:-1])
    assert a.verify(register(("Authorization", short)), T0, lookup, proxy=False).status is (
        AuthStatus.FAILED
    )


def test_malformed_line_for_another_realm_does_not_hide_ours() -> None:
    a = auth()
    mine = answer(a.challenge(T0, proxy=True)[0][1])
    req = register(("Proxy-Authorization", 'Digest realm="x", junk'), ("Proxy-Authorization", mine))
    assert a.verify(req, T0, lookup, proxy=True).ok


# --- fuzzing ---------------------------------------------------------------------------

_alphabet = st.sampled_from(
    list('Digest usernamrlmcq=,"\\ \t;:/@.-0123456789abcdef\r\n\x00é\ud800')
)
_fragments = st.sampled_from(
    [
        "Digest ",
        'username="alice"',
        f'realm="{REALM}"',
        'nonce="x"',
        f'uri="{RURI}"',
        'response="6629fae49393a05397450978507c4ef1"',
        "qop=auth",
        "nc=00000001",
        'cnonce="c"',
        "algorithm=MD5-sess",
        "algorithm=SHA-256",
        ", ",
        ",",
        '"',
        "=",
        "\\",
        " ",
        "Basic ",
    ]
)


@given(st.one_of(st.text(_alphabet, max_size=80), st.lists(_fragments, max_size=20).map("".join)))
def test_arbitrary_authorization_values_never_raise(value: str) -> None:
    a = auth()
    for proxy in (False, True):
        req = register(("Proxy-Authorization" if proxy else "Authorization", value))
        result = a.verify(req, T0, lookup, proxy=proxy)
        assert result.status in AuthStatus
    # parse_credentials may reject the value, but only with ParseError.
    with contextlib.suppress(ParseError):
        parse_credentials(value)


@given(st.text(max_size=60))
def test_arbitrary_text_never_raises(value: str) -> None:
    req = register(("Authorization", f'Digest realm="{REALM}", {value}'))
    assert auth().verify(req, T0, lookup, proxy=False).status in AuthStatus
    req = register(("Authorization", value))
    assert auth().verify(req, T0, lookup, proxy=False).status in AuthStatus
