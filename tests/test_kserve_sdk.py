"""The KServe SDK's own REST and gRPC clients against a real `ketch serve`
(``tests/kserve_sdk_cases.py``), run by a pytest of their own: the SDK's generated protobuf
module and tritonclient's, which the other tests import, define the same ``inference``
messages, and one process's protobuf descriptor pool refuses to hold both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).with_name("kserve_sdk_cases.py")
#: Generous: the cases start one server and make a few dozen calls (about 2 s here).
CASES_TIMEOUT_S = 300


def test_the_kserve_sdk_clients_speak_to_ketch() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider", "-rA"],
        cwd=CASES.parent.parent,
        capture_output=True,
        text=True,
        timeout=CASES_TIMEOUT_S,
        check=False,
    )
    passed = [line for line in run.stdout.splitlines() if line.startswith("PASSED ")]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    # Every case ran: REST and gRPC health, metadata, infer, BYTES, parameters, errors.
    assert len(passed) == 12, run.stdout[-3000:]
