"""What the benchmark runs on: the tools it needs, the machine, and the processes it
measures, read from /proc.

CPU time is user + system time from ``/proc/<pid>/stat``, summed over a process and
every descendant (Kamailio forks its workers and timers; a p2psip with workers forks
too), so a server's figure is all the CPU it used, in whichever process. Memory is the
proportional set size (``Pss`` in ``/proc/<pid>/smaps_rollup``): pages shared between
forked processes (Kamailio's shared memory holds its location table) count once in the
sum, where RSS would count them once per process.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


class MissingTool(Exception):
    """A tool the run needs is not installed; the message names the install command."""


# name -> (how to find it, how to install it on Debian/Ubuntu)
INSTALL = {
    "sipp": "apt-get install sip-tester",
    "kamailio": "apt-get install kamailio",
    "redis-server": "apt-get install redis-server",
    "matplotlib": f"{Path(sys.executable).parent}/pip install -e '.[bench]'",
}


def find_tool(name: str) -> str:
    """The path of ``name`` (Kamailio lives in /usr/sbin, outside a user's PATH)."""
    if name == "matplotlib":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise MissingTool(f"matplotlib is missing: {INSTALL[name]}") from None
        return "matplotlib"
    found = shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/local/sbin") if (p := Path(d) / name).exists()),
        None,
    )
    if found is None:
        raise MissingTool(f"{name} is missing: {INSTALL[name]}")
    return found


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return lines[0] if lines else "?"


def machine_info(tools: dict[str, str]) -> dict[str, str]:
    """Cores, CPU model, kernel, Python and the versions of everything measured."""
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    info = {
        "host": platform.node(),
        "cores": str(os.cpu_count()),
        "cpu": model,
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "p2psip": f"commit {commit}" + (" plus uncommitted changes" if dirty else ""),
    }
    if "sipp" in tools:
        info["sipp"] = _first_line([tools["sipp"], "-v"]).removeprefix("SIPp ")
    if "kamailio" in tools:
        info["kamailio"] = _first_line([tools["kamailio"], "-v"]).removeprefix("version: ")
    if "redis-server" in tools:
        info["redis"] = _first_line([tools["redis-server"], "--version"])
    return info


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# --- processes -------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # after "pid (comm)": fields from 3 (state) on


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now, found by their parent pid."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds summed over ``pids`` (a process gone counts 0)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def memory_mb(pids: list[int]) -> float:
    """Proportional set size summed over ``pids`` in MB (RSS if smaps_rollup is missing)."""
    total_kb = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            total_kb += next(int(line.split()[1]) for line in text.splitlines()
                             if line.startswith("Pss:"))  # fmt: skip
        except (OSError, StopIteration):
            try:
                total_kb += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
            except (OSError, IndexError, ValueError):
                continue
    return round(total_kb / 1024, 1)


@dataclass(frozen=True, slots=True)
class MachineCpu:
    """The whole machine's busy and total CPU time, from the first line of /proc/stat."""

    busy: float
    total: float

    @classmethod
    def now(cls) -> MachineCpu:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]  # idle, iowait
        total = sum(values[:8])  # guest time is already in user
        return cls((total - idle) / CLOCK_TICKS, total / CLOCK_TICKS)


# --- network ---------------------------------------------------------------------------


def free_port(host: str) -> int:
    """A port free on both UDP and TCP at ``host`` right now."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no port free for both UDP and TCP on {host}")


def answers_options(host: str, port: int, timeout: float = 0.3) -> bool:
    """Does a SIP server at host:port answer an OPTIONS to itself with 200?"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        local = sock.getsockname()[1]
        probe = (
            f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{local};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport\r\n"
            f"From: <sip:bench@{host}>;tag={uuid.uuid4().hex[:8]}\r\n"
            f"To: <sip:{host}:{port}>\r\nCall-ID: {uuid.uuid4().hex}\r\n"
            "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
        sock.settimeout(timeout)
        sock.sendto(probe.encode(), (host, port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if sock.recv(65535).startswith(b"SIP/2.0 200"):
                    return True
            except TimeoutError:
                return False
        return False
