"""The RFC 4475 torture messages (tests/data/rfc4475/*.dat, byte-exact)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent.parent / "data" / "rfc4475"

# RFC 4475 §3.1.1 and §3.3 messages that are well-formed: they parse and validate.
VALID = (
    "wsinv", "intmeth", "esc01", "escnull", "esc02", "lwsdisp", "longreq", "dblreq",
    "semiuri", "transports", "mpart01", "unreason", "noreason",
    "badbranch", "bcast", "bext01", "cparam01", "cparam02", "regescrt", "regaut01",
    "invut", "sdp01", "unkscm", "novelsc", "unksm2", "zeromf", "inv2543",
)  # fmt: skip


def names() -> list[str]:
    return sorted(p.stem for p in CORPUS_DIR.glob("*.dat"))


@cache
def load(name: str) -> bytes:
    return (CORPUS_DIR / f"{name}.dat").read_bytes()
