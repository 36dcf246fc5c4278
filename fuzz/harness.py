"""What the atheris harnesses share: the seed corpus and how libFuzzer is started.

Run a harness as a script (``python fuzz/fuzz_parser.py [libFuzzer flags] [corpus dirs]``).
With no corpus directory, it fuzzes into a fresh temporary one, seeded with the RFC 4475
torture messages (tests/data/rfc4475, which libFuzzer only reads: new inputs go to the
first directory). See fuzz/README.md.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "tests" / "data" / "rfc4475"


def libfuzzer_argv(argv: list[str]) -> list[str]:
    """``argv`` with the default corpus directories added when it names none."""
    if any(not arg.startswith("-") for arg in argv[1:]):
        return argv
    work = tempfile.mkdtemp(prefix="p2psip-fuzz-")
    return [*argv, work, str(SEEDS)]


def run(test_one_input: Callable[[bytes], None]) -> None:
    import atheris  # here, so that the contract checks import without it

    atheris.Setup(libfuzzer_argv(sys.argv), test_one_input)
    atheris.Fuzz()
