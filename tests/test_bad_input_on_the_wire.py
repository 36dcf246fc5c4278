"""What a phone on UDP sees when it sends a request the parser refuses (a real site).

The core builds the answer (tests/sip/test_bad_input.py); these send the bytes to a site
and wait for the answer at the phone's socket. Phones ask for ``rport`` (RFC 3581), so
the answer must go to the source address and port, not to the Via's sent-by.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.config import Config, HostPort
from proxy.site import Site, build_site

HOST = "127.0.0.1"
WAIT = 2.0


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    config = Config(
        sip_listen=HostPort(HOST, 0),
        dht_listen=HostPort(HOST, 0),
        data_dir=tmp_path / "data",
        domains=("example.com",),
    )
    site = await build_site(config)
    await site.start()
    yield site
    await site.close()


def request(site: Site, phone_port: int, version: str, length: int, *, rport: bool) -> bytes:
    # With rport, sent-by names a port nobody listens on (as behind a NAT).
    sent_by = f"{HOST}:9" if rport else f"{HOST}:{phone_port}"
    return (
        f"OPTIONS sip:{HOST}:{site.sip_port} {version}\r\n"
        f"Via: {version}/UDP {sent_by};branch=z9hG4bK{uuid.uuid4().hex[:10]}"
        f"{';rport' if rport else ''}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:alice@{HOST}>;tag=a1\r\n"
        f"To: <sip:{HOST}:{site.sip_port}>\r\n"
        f"Call-ID: {uuid.uuid4().hex}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        f"Content-Length: {length}\r\n\r\n"
        "v=0\r\n"
    ).encode()


async def status_line(site: Site, version: str, length: int, *, rport: bool) -> bytes | None:
    """Send from a fresh UDP socket; the status line that came back, or None."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
        phone.bind((HOST, 0))
        phone.setblocking(False)
        data = request(site, phone.getsockname()[1], version, length, rport=rport)
        phone.sendto(data, (HOST, site.sip_port))
        try:
            answer = await asyncio.wait_for(loop.sock_recv(phone, 65535), WAIT)
        except TimeoutError:
            return None
    return answer.split(b"\r\n", 1)[0]


# (SIP version, Content-Length for a 5-byte body, status line a phone must get)
CASES = [
    pytest.param("SIP/3.0", 5, b"SIP/2.0 505 Version Not Supported", id="SIP/3.0"),
    pytest.param("SIP/2.0", 500, b"SIP/2.0 400 Bad Request", id="Content-Length"),
]


@pytest.mark.parametrize(("version", "length", "expected"), CASES)
async def test_answered_at_sent_by(site: Site, version: str, length: int, expected: bytes) -> None:
    assert await status_line(site, version, length, rport=False) == expected


@pytest.mark.parametrize(("version", "length", "expected"), CASES)
async def test_answered_at_the_source_with_rport(
    site: Site, version: str, length: int, expected: bytes
) -> None:
    assert await status_line(site, version, length, rport=True) == expected
