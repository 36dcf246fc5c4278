"""Child process running ONE pjsua2 phone, driven by JSON lines on stdin.

pjsua2 allows a single Endpoint per process, so every test phone lives in its own
process and ``tests/support/phone.py`` talks to it over pipes:

* stdin: one JSON command per line, ``{"id": 7, "cmd": "call", "uri": "sip:..."}``.
* stdout: one JSON object per line. ``{"type": "reply", "id": 7, "ok": true, ...}``
  answers a command; ``ready``, ``reg``, ``incoming`` and ``call_state`` are events.
* stderr: pjsua2's own log (and anything else written by C code).

The library runs with no worker threads (``threadCnt = 0``, ``mainThreadOnly``), so
every pjsua2 callback fires inside ``ep.libHandleEvents()`` on the main thread,
interleaved with command handling; no locking is needed.

This file is a standalone script: it imports only the stdlib and pjsua2.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import selectors
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

# pjsua2 logs through printf() and prints a banner before any log config applies.
# Keep a private duplicate of fd 1 for our JSON protocol, then point fd 1 at stderr so
# nothing from C code can corrupt stdout. This must happen before pjsua2 is loaded.
_PROTOCOL_FD = os.dup(1)
os.dup2(2, 1)
sys.stdout = sys.stderr

import pjsua2 as pj  # noqa: E402  (must come after the fd shuffle above)

POLL_MS = 10
# Longest wait for BYE/unREGISTER answers when shutting down.
SHUTDOWN_GRACE_S = 2.0

STATE_NAMES: dict[int, str] = {
    getattr(pj, name): name.removeprefix("PJSIP_INV_STATE_")
    for name in (
        "PJSIP_INV_STATE_NULL",
        "PJSIP_INV_STATE_CALLING",
        "PJSIP_INV_STATE_INCOMING",
        "PJSIP_INV_STATE_EARLY",
        "PJSIP_INV_STATE_CONNECTING",
        "PJSIP_INV_STATE_CONFIRMED",
        "PJSIP_INV_STATE_DISCONNECTED",
    )
}


class CommandError(Exception):
    """A command that cannot be carried out; reported back as ``ok: false``."""


@dataclass(frozen=True, slots=True)
class Registration:
    proxy: str
    user: str
    domain: str
    password: str | None
    expires: int
    registrar: str | None


class Output:
    """Line-oriented JSON writer on the private protocol fd."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def send(self, obj: dict[str, Any]) -> None:
        self._stream.write(json.dumps(obj) + "\n")
        self._stream.flush()


class PhoneAccount(pj.Account):  # type: ignore[misc]
    def __init__(self, agent: Agent, generation: int) -> None:
        super().__init__()
        self.agent = agent
        self.generation = generation
        self.reg_done = False

    def onRegState(self, prm: Any) -> None:  # pjsua2 callback names are camelCase
        self.reg_done = True
        info = self.getInfo()
        self.agent.out.send(
            {
                "type": "reg",
                "generation": self.generation,
                "code": int(prm.code),
                "reason": str(prm.reason),
                "expiration": int(prm.expiration),
                "active": bool(info.regIsActive),
                "msg": str(prm.rdata.wholeMsg),
            }
        )

    def onIncomingCall(self, prm: Any) -> None:
        call = PhoneCall(self.agent, self, prm.callId)
        info = call.getInfo()
        self.agent.out.send(
            {
                "type": "incoming",
                "handle": call.handle,
                "remote_uri": str(info.remoteUri),
                "local_uri": str(info.localUri),
                "call_id": str(info.callIdString),
                "src": str(prm.rdata.srcAddress),
                "msg": str(prm.rdata.wholeMsg),
            }
        )
        if self.agent.auto_ringing:
            op = pj.CallOpParam()
            op.statusCode = 180
            call.answer(op)


class PhoneCall(pj.Call):  # type: ignore[misc]
    def __init__(self, agent: Agent, account: PhoneAccount, call_id: int = -1) -> None:
        if call_id == -1:
            super().__init__(account)
        else:
            super().__init__(account, call_id)
        self.agent = agent
        # pjsua reuses call ids (slot numbers), so the controller sees our own handles.
        self.handle = agent.register_call(self)

    def onCallState(self, prm: Any) -> None:
        info = self.getInfo()
        state = STATE_NAMES.get(int(info.state), str(info.stateText))
        self.agent.out.send(
            {
                "type": "call_state",
                "handle": self.handle,
                "state": state,
                "code": int(info.lastStatusCode),
                "reason": str(info.lastReason),
                "call_id": str(info.callIdString),
                "remote_uri": str(info.remoteUri),
                "local_uri": str(info.localUri),
            }
        )
        if state == "DISCONNECTED":
            # Never drop the SWIG object inside its own callback; the loop reaps it.
            self.agent.finished.append(self.handle)

    def onCallTsxState(self, prm: Any) -> None:
        # Final responses to requests inside the call (a re-INVITE's 200, a BYE's).
        try:
            tsx = prm.e.body.tsxState.tsx
            method, code, role = str(tsx.method), int(tsx.statusCode), int(tsx.role)
        except Exception:  # not every event carries a transaction
            return
        if code >= 200 and role == pj.PJSIP_ROLE_UAC:
            self.agent.out.send(
                {"type": "tsx", "handle": self.handle, "method": method, "code": code}
            )


class Agent:
    def __init__(self, args: argparse.Namespace, out: Output) -> None:
        self.out = out
        self.name: str = args.name
        self.transport: str = args.transport
        self.tls_ca: str | None = args.tls_ca
        self.tls_verify: bool = args.tls_verify
        self.sips: bool = args.sips
        self.bind_ip: str = args.bind_ip
        # An IPv6 address binds IPv6 transports and is written [v6] in URIs.
        self.ipv6 = ":" in self.bind_ip
        self.uri_host = f"[{self.bind_ip}]" if self.ipv6 else self.bind_ip
        self.auto_ringing: bool = args.auto_ringing
        # RFC 5626: an instance id of this phone's own (pjsua's default is made from the
        # host name, the same for every phone of a test).
        self.outbound: bool = args.outbound
        self.instance = f"<urn:uuid:{uuid.uuid4()}>"
        self.calls: dict[int, PhoneCall] = {}
        self.finished: list[int] = []
        self._next_handle = 1
        self._generation = 0
        self.registration: Registration | None = None
        self.running = True

        self.ep = pj.Endpoint()
        self.ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = True
        cfg.uaConfig.userAgent = f"p2psip-test-phone ({self.name})"
        cfg.uaConfig.maxCalls = 8
        cfg.logConfig.level = args.log_level
        cfg.logConfig.consoleLevel = args.log_level
        cfg.logConfig.msgLogging = args.log_level >= 4
        cfg.medConfig.noVad = True
        self.ep.libInit(cfg)
        if args.t1_ms:
            set_sip_timers(args.t1_ms)

        tcfg = pj.TransportConfig()
        tcfg.port = 0
        tcfg.boundAddress = self.bind_ip
        tcfg.publicAddress = self.bind_ip
        tp_type = {
            "tcp": pj.PJSIP_TRANSPORT_TCP,
            "tls": pj.PJSIP_TRANSPORT_TLS,
        }.get(self.transport, pj.PJSIP_TRANSPORT_UDP)
        if self.ipv6:
            tp_type = {
                pj.PJSIP_TRANSPORT_UDP: pj.PJSIP_TRANSPORT_UDP6,
                pj.PJSIP_TRANSPORT_TCP: pj.PJSIP_TRANSPORT_TCP6,
            }.get(tp_type, tp_type | pj.PJSIP_TRANSPORT_IPV6)
        if self.transport == "tls":
            if self.tls_ca:
                tcfg.tlsConfig.CaListFile = self.tls_ca
            tcfg.tlsConfig.verifyServer = self.tls_verify
        self.transport_id: int = self.ep.transportCreate(tp_type, tcfg)
        self.ep.libStart()
        self.ep.audDevManager().setNullDev()

        local_name = str(self.ep.transportGetInfo(self.transport_id).localName)
        self.port = int(local_name.rsplit(":", 1)[1])
        # A local account (no registrar, no proxy) so the phone can place and receive
        # direct calls before, or without, ever registering.
        self.account = self._create_account(None)

    # -- accounts -------------------------------------------------------------

    def _tp_param(self) -> str:
        return "" if self.transport == "udp" else f";transport={self.transport}"

    def _proxy_uri(self, proxy: str, params: str = "") -> str:
        if self.sips:
            return f"sips:{proxy}{params}"
        return f"sip:{proxy}{params}{self._tp_param()}"

    def _create_account(self, reg: Registration | None) -> PhoneAccount:
        acfg = pj.AccountConfig()
        if reg is None:
            acfg.idUri = f"sip:{self.name}@{self.uri_host}:{self.port}{self._tp_param()}"
        else:
            acfg.idUri = f"sip:{reg.user}@{reg.domain}"
            acfg.regConfig.registrarUri = reg.registrar or self._proxy_uri(reg.proxy)
            acfg.regConfig.timeoutSec = reg.expires
            acfg.regConfig.retryIntervalSec = 0  # report failures, never retry behind our back
            acfg.regConfig.registerOnAdd = True
            acfg.sipConfig.proxies.append(self._proxy_uri(reg.proxy, ";lr"))
            if self.sips:
                # pjsua writes sip:...;transport=TLS Contacts (PJSUA_SECURE_SCHEME); a
                # pjsua2 callee of a sips: call wants a sips: one (RFC 5630), else 480.
                contact = f"<sips:{reg.user}@{self.uri_host}:{self.port}>"
                acfg.sipConfig.contactForced = contact
            if reg.password is not None:
                acfg.sipConfig.authCreds.append(
                    pj.AuthCredInfo("digest", "*", reg.user, 0, reg.password)
                )
        acfg.sipConfig.transportId = self.transport_id
        # Loopback tests want the Contact/Via the phone was configured with: no NAT
        # rewriting, no RFC 5626 outbound unless asked for (--outbound), and the
        # listening port (not the ephemeral TCP source port) in the Contact.
        nat = acfg.natConfig
        nat.contactRewriteUse = 0
        nat.viaRewriteUse = 0
        nat.sdpNatRewriteUse = 0
        nat.sipOutboundUse = int(self.outbound)
        if self.outbound:
            nat.sipOutboundInstanceId = self.instance
            nat.sipOutboundRegId = "1"
        nat.contactUseSrcPort = 0
        nat.iceEnabled = False
        nat.turnEnabled = False
        # This pjsua2 wheel asserts ipv6Use == DISABLED in pjsua_acc_add (as a build
        # without PJ_HAS_IPV6 does), and RTP cannot bind ::1 without it: an IPv6
        # phone's SIP is IPv6, its RTP stays on IPv4.
        media = "127.0.0.1" if self.ipv6 else self.bind_ip
        acfg.mediaConfig.transportConfig.boundAddress = media
        acfg.mediaConfig.transportConfig.publicAddress = media
        self._generation += 1
        account = PhoneAccount(self, self._generation)
        account.create(acfg, True)
        return account

    def register(self, reg: Registration) -> dict[str, Any]:
        if reg == self.registration:
            self.account.setRegistration(True)  # a refresh: same Call-ID, next CSeq
        else:
            old = self.account
            self.account = self._create_account(reg)
            self.registration = reg
            old.shutdown()
        return {"generation": self.account.generation}

    def unregister(self) -> dict[str, Any]:
        if self.registration is None:
            raise CommandError("phone has never registered")
        self.account.setRegistration(False)
        return {"generation": self.account.generation}

    # -- calls ----------------------------------------------------------------

    def register_call(self, call: PhoneCall) -> int:
        handle = self._next_handle
        self._next_handle += 1
        self.calls[handle] = call
        return handle

    def _call(self, handle: Any) -> PhoneCall:
        call = self.calls.get(handle) if isinstance(handle, int) else None
        if call is None:
            raise CommandError(f"no active call with handle {handle!r}")
        return call

    def make_call(self, uri: str) -> dict[str, Any]:
        call = PhoneCall(self, self.account)
        try:
            call.makeCall(uri, pj.CallOpParam(True))
        except Exception:
            self.calls.pop(call.handle, None)
            raise
        return {"handle": call.handle}

    def answer(self, handle: Any, code: int) -> dict[str, Any]:
        op = pj.CallOpParam()
        op.statusCode = code
        self._call(handle).answer(op)
        return {}

    def hangup(self, handle: Any, code: int | None) -> dict[str, Any]:
        op = pj.CallOpParam()
        if code is not None:
            op.statusCode = code
        self._call(handle).hangup(op)
        return {}

    def reinvite(self, handle: Any) -> dict[str, Any]:
        """Send a re-INVITE in the call (same media), as a phone does for hold/resume."""
        self._call(handle).reinvite(pj.CallOpParam(True))
        return {}

    def reap(self) -> None:
        for handle in self.finished:
            self.calls.pop(handle, None)
        self.finished.clear()

    # -- protocol -------------------------------------------------------------

    def handle(self, msg: dict[str, Any]) -> None:
        cmd_id = msg.get("id")
        try:
            result = self._dispatch(msg)
        except Exception as exc:  # report every failure to the controller, keep running
            self.out.send({"type": "reply", "id": cmd_id, "ok": False, "error": describe(exc)})
        else:
            self.out.send({"type": "reply", "id": cmd_id, "ok": True, **result})

    def _dispatch(self, msg: dict[str, Any]) -> dict[str, Any]:
        cmd = msg.get("cmd")
        if cmd == "register":
            password = msg.get("password")
            registrar = msg.get("registrar")
            return self.register(
                Registration(
                    proxy=str(msg["proxy"]),
                    user=str(msg["user"]),
                    domain=str(msg["domain"]),
                    password=None if password is None else str(password),
                    expires=int(msg.get("expires", 300)),
                    registrar=None if registrar is None else str(registrar),
                )
            )
        if cmd == "unregister":
            return self.unregister()
        if cmd == "call":
            return self.make_call(str(msg["uri"]))
        if cmd == "answer":
            return self.answer(msg.get("handle"), int(msg.get("code", 200)))
        if cmd == "hangup":
            code = msg.get("code")
            return self.hangup(msg.get("handle"), None if code is None else int(code))
        if cmd == "reinvite":
            return self.reinvite(msg.get("handle"))
        if cmd == "quit":
            self.running = False
            return {}
        raise CommandError(f"unknown command {cmd!r}")

    def shutdown(self) -> None:
        """Hang up, unregister, destroy: each step bounded, none left to libDestroy.

        libDestroy() on its own busy-sleeps about a second "for responses"; doing the
        graceful part here and passing PJSUA_DESTROY_NO_RX_MSG keeps close() fast.
        """
        if self.calls:
            self.ep.hangupAllCalls()
            self._pump_until(lambda: len(self.calls) == len(self.finished))
        self.reap()
        self.calls.clear()
        if self.registration is not None and self.account.getInfo().regIsActive:
            self.account.reg_done = False
            self.account.setRegistration(False)
            self._pump_until(lambda: self.account.reg_done)
        self.account.shutdown()
        self.ep.libDestroy(pj.PJSUA_DESTROY_NO_RX_MSG)

    def _pump_until(self, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while not done() and time.monotonic() < deadline:
            self.ep.libHandleEvents(POLL_MS)


def describe(exc: BaseException) -> str:
    # pjsua2's Error carries its details in attributes, not in str().
    info = getattr(exc, "info", None)
    if callable(info):
        try:
            return str(info())
        except Exception:
            pass
    return f"{type(exc).__name__}: {exc}"


def set_sip_timers(t1_ms: int) -> None:
    """Shrink RFC 3261 T1 (and so Timer B/F = 64*T1) so UDP timeouts take seconds.

    pjsua2 does not expose transaction timers; ``pjsip_tsx_set_timers`` is exported by
    the extension module itself, so reach it through ctypes. T2 and T4 keep RFC values.
    """
    import pjsua2._pjsua2 as ext

    lib = ctypes.CDLL(ext.__file__)
    lib.pjsip_tsx_set_timers.argtypes = [ctypes.c_uint] * 4
    lib.pjsip_tsx_set_timers.restype = None
    lib.pjsip_tsx_set_timers(t1_ms, max(t1_ms, 4000), 5000, 64 * t1_ms)


class CommandReader:
    """Non-blocking JSON-line reader on stdin."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        os.set_blocking(fd, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(fd, selectors.EVENT_READ)
        self._buffer = b""
        self.eof = False

    def poll(self) -> list[dict[str, Any]]:
        if self.eof or not self._selector.select(timeout=0):
            return []
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return []
        if not chunk:
            self.eof = True
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        commands = []
        for line in lines:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = {"cmd": None, "bad_line": line.decode(errors="replace")}
            commands.append(obj if isinstance(obj, dict) else {"cmd": None})
        return commands


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--transport", choices=("udp", "tcp", "tls"), default="udp")
    parser.add_argument("--tls-ca", default=None, help="PEM file of trusted CAs (TLS)")
    parser.add_argument("--tls-verify", action="store_true", help="check the proxy (TLS)")
    parser.add_argument("--sips", action="store_true", help="sips: proxy and Contact (TLS)")
    parser.add_argument("--bind-ip", default="127.0.0.1")
    parser.add_argument("--log-level", type=int, default=1)
    parser.add_argument("--t1-ms", type=int, default=0)
    parser.add_argument("--no-auto-ringing", dest="auto_ringing", action="store_false")
    parser.add_argument("--outbound", action="store_true", help="register with RFC 5626")
    return parser.parse_args(argv)


def main() -> int:
    # The controller ends us by "quit" or by closing stdin; a terminal ^C aimed at
    # pytest must not raise KeyboardInterrupt inside a pjsua2 callback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    args = parse_args()
    out = Output(os.fdopen(_PROTOCOL_FD, "w", buffering=1))
    try:
        agent = Agent(args, out)
    except Exception as exc:
        out.send({"type": "fatal", "error": describe(exc)})
        return 1
    out.send({"type": "ready", "port": agent.port, "transport": agent.transport})
    reader = CommandReader(sys.stdin.fileno())
    while agent.running and not reader.eof:
        agent.ep.libHandleEvents(POLL_MS)
        agent.reap()
        for msg in reader.poll():
            agent.handle(msg)
    agent.shutdown()
    out.send({"type": "bye"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
