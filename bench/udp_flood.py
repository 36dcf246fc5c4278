"""A bounded UDP flood of SIP requests from one loopback address, at C speed (sendmmsg).

Used by tests/test_flood.py (as a subprocess) and bench/udp_receive.py. It sends only to
127.0.0.0/8 and stops at ``--count`` datagrams or after ``--duration`` seconds, whichever
comes first, pacing itself to ``--rate`` per second. One ``sendmmsg(2)`` system call
carries up to 256 datagrams (through ctypes: Python has no sendmmsg), so one process
reaches several hundred thousand datagrams per second on loopback.

The datagrams are REGISTER (or OPTIONS) requests with distinct branches and Call-IDs,
so a proxy that let them through would have to treat each as a new transaction.

    .venv/bin/python bench/udp_flood.py --target 127.0.0.1:5060 --source 127.0.0.9 \\
        --rate 30000 --duration 10 --count 300000

Prints one JSON line: {"sent": N, "seconds": S, "rate": N/S, "errors": E}.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import ipaddress
import json
import os
import socket
import sys
import time
import uuid

BATCH = 256


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint))


def requests(target: tuple[str, int], source: str, port: int, method: str, n: int) -> list[bytes]:
    host, tport = target
    out = []
    for i in range(n):
        tag = uuid.uuid4().hex[:8]
        out.append(
            (
                f"{method} sip:{host}:{tport} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {source}:{port};branch=z9hG4bK{uuid.uuid4().hex};rport\r\n"
                "Max-Forwards: 70\r\n"
                f"From: <sip:flood{i}@{host}>;tag={tag}\r\n"
                f"To: <sip:flood{i}@{host}>\r\n"
                f"Call-ID: {uuid.uuid4().hex}@{source}\r\n"
                f"CSeq: 1 {method}\r\n"
                f"Contact: <sip:flood{i}@{source}:{port}>\r\n"
                "Expires: 3600\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode()
        )
    return out


def flood(
    target: tuple[str, int],
    source: str,
    *,
    rate: float,
    duration: float,
    count: int,
    method: str = "REGISTER",
) -> dict[str, float]:
    for addr in (target[0], source):
        if not ipaddress.ip_address(addr).is_loopback:
            raise SystemExit(f"{addr} is not a loopback address: this tool floods 127/8 only")
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.connect(target)  # no address per message; ICMP errors come back as ECONNREFUSED
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    port = sock.getsockname()[1]
    payloads = requests(target, source, port, method, BATCH)
    keep = [ctypes.create_string_buffer(p, len(p)) for p in payloads]
    iovs = (_Iovec * BATCH)()
    msgs = (_Mmsghdr * BATCH)()
    for i, buf in enumerate(keep):
        iovs[i].iov_base = ctypes.cast(buf, ctypes.c_void_p)
        iovs[i].iov_len = len(payloads[i])
        msgs[i].msg_hdr.msg_iov = ctypes.pointer(iovs[i])
        msgs[i].msg_hdr.msg_iovlen = 1
    fd = sock.fileno()
    sent = errors = 0
    start = time.monotonic()
    end = start + duration
    offset = 0
    while sent < count:
        now = time.monotonic()
        if now >= end:
            break
        due = min(count, int(rate * (now - start)) + 1) - sent
        if due <= 0:
            time.sleep(min(0.001, end - now))
            continue
        n = min(due, BATCH - offset)
        ptr = ctypes.cast(ctypes.byref(msgs, offset * ctypes.sizeof(_Mmsghdr)),
                          ctypes.POINTER(_Mmsghdr))  # fmt: skip
        done = libc.sendmmsg(fd, ptr, n, 0)
        if done < 0:
            errors += 1
            if ctypes.get_errno() not in (errno.ECONNREFUSED, errno.EAGAIN):
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            time.sleep(0.001)
            continue
        sent += done
        offset = (offset + done) % BATCH
    seconds = time.monotonic() - start
    sock.close()
    rate_done = round(sent / seconds)
    return {"sent": sent, "seconds": round(seconds, 3), "rate": rate_done, "errors": errors}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, metavar="HOST:PORT")
    p.add_argument("--source", default="127.0.0.9", metavar="HOST")
    p.add_argument("--rate", type=float, default=30000.0, help="datagrams per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds, at most")
    p.add_argument("--count", type=int, default=300000, help="datagrams, at most")
    p.add_argument("--method", default="REGISTER")
    args = p.parse_args()
    host, _, port = args.target.rpartition(":")
    result = flood((host, int(port)), args.source, rate=args.rate, duration=args.duration,
                   count=args.count, method=args.method)  # fmt: skip
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
