"""The atheris harnesses in fuzz/ run for a short, bounded time and find no crash.

Both run at once, as subprocesses, each for FUZZ_SECONDS (8 unless P2PSIP_FUZZ_SECONDS
says otherwise), seeded with the RFC 4475 torture messages; an input that takes more
than 5 s is a crash too (a slow input is a denial of service). A crash fails the test
with libFuzzer's report and the path of the saved input, which reproduces it:
``python fuzz/fuzz_parser.py <that file>``. fuzz/README.md says how to run them longer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
SEEDS = ROOT / "tests" / "data" / "rfc4475"
HARNESSES = ("fuzz_parser.py", "fuzz_framer.py")
FUZZ_SECONDS = int(os.environ.get("P2PSIP_FUZZ_SECONDS", "8"))

pytest.importorskip("atheris", reason="atheris is in the test extras: pip install -e .[test]")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[int, str]]]:
    """Start every harness at once; harness -> (exit status, libFuzzer's output)."""
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for name in HARNESSES:
        work = tmp_path_factory.mktemp(name.removesuffix(".py"))
        corpus = work / "corpus"  # new inputs go here; the seeds are only read
        corpus.mkdir()
        log = work / "libfuzzer.log"
        argv = [
            *(sys.executable, str(FUZZ / name)),
            *(f"-max_total_time={FUZZ_SECONDS}", "-timeout=5", "-rss_limit_mb=1024"),
            *(f"-artifact_prefix={work}/", str(corpus), str(SEEDS)),
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, cwd=work, stdout=out, stderr=subprocess.STDOUT)
        procs[name] = (proc, log)
    results: dict[str, tuple[int, str]] = {}
    try:
        for name, (proc, log) in procs.items():
            code = proc.wait(timeout=FUZZ_SECONDS + 120)
            results[name] = (code, log.read_text(errors="replace"))
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    yield results


@pytest.mark.parametrize("name", HARNESSES)
def test_the_harness_finds_no_crash(runs: dict[str, tuple[int, str]], name: str) -> None:
    code, output = runs[name]
    report = "\n".join(output.splitlines()[-60:])
    assert code == 0, f"{name} exited {code}:\n{report}"
    # It did fuzz: the seeds were read and inputs were run until the time was up.
    assert "files found in " + str(SEEDS) in output, report
    assert "Done " in output and " runs in " in output, report
