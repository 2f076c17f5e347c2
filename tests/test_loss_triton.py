"""The loss-level parity tests of test_loss.py with the Triton backend, under TRITON_INTERPRET=1.

The interpreter must be switched on before triton is imported, so the module runs in a fresh process.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loss_parity_with_triton_backend_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", CEM_TEST_BACKENDS="triton")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-x",
            "tests/test_loss.py",
            "-k",
            "matches_reference or edge_cases or paper_full_covariance",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout and "skipped" not in proc.stdout, tail
