"""What authenticating a relayed request costs: signing it at the sending site and
verifying it at the home proxy (proxy.relay_auth), in microseconds per request, next to
what parsing and forwarding the same INVITE costs.

    .venv/bin/python bench/relay_auth.py [--requests N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dht_adaptor.keys import SiteKey, TrustStore
from proxy.relay_auth import HEADER, RelayVerifier, sign
from proxy.sip.message import parse_message

INVITE = (
    b"INVITE sip:bob@example.com;p2psip=home SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.2:5060;branch=z9hG4bK-0123456789ab-cafe;rport\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKphone;rport=5060;received=192.0.2.10\r\n"
    b"Record-Route: <sip:192.0.2.2:5060;lr;p2d=0123456789abcdef>\r\n"
    b"Max-Forwards: 69\r\nFrom: <sip:alice@example.com>;tag=f00d\r\n"
    b"To: <sip:bob@example.com>\r\nCall-ID: bench@192.0.2.10\r\nCSeq: 1 INVITE\r\n"
    b"P-Asserted-Identity: <sip:alice@example.com>\r\n"
    b"Contact: <sip:alice@192.0.2.10:5060>\r\nContent-Type: application/sdp\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def per_call(fn: object, n: int) -> float:
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            fn()  # type: ignore[operator]
        samples.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    n = parser.parse_args().requests
    key = SiteKey.generate()
    trust = TrustStore({key.key_id: key.public_bytes})
    req = parse_message(INVITE)
    now = time.time()
    headers = [sign(req, key, now) for _ in range(n * 5)]
    signed = []
    for value in headers:
        r = req.copy()
        r.headers.add(HEADER, value)
        signed.append(r)
    it = iter(signed)
    verifier = RelayVerifier(trust)
    sign_us = per_call(lambda: sign(req, key, now), n)
    verify_us = per_call(lambda: verifier.verify(next(it), now), n)
    parse_us = per_call(lambda: parse_message(INVITE).top_via, n)
    print(f"sign a relay:    {sign_us:7.1f} us per request (sending site)")
    print(f"verify a relay:  {verify_us:7.1f} us per request (home proxy)")
    print(f"parse the INVITE:{parse_us:7.1f} us (for scale)")
    print(f"header size:     {len(HEADER) + 2 + len(headers[0])} bytes")


if __name__ == "__main__":
    main()
