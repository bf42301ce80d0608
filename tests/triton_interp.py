"""Running a test file's Triton tests in Triton's interpreter (CPU machines without a GPU).

The interpreter must be switched on before anything imports triton (transformers does), so the
selected tests run in a subprocess with TRITON_INTERPRET=1; inside it, INTERPRETED is true."""
import importlib.util
import os
import re
import subprocess
import sys

import torch

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# the outer test that starts the subprocess runs only on a CPU machine with triton, outside the interpreter
OUTER_ONLY = {"condition": CUDA or INTERPRETED or not HAS_TRITON, "reason": "CPU machine with triton installed only"}


def run_in_interpreter(test_file: str, keyword: str, expect: int, timeout: int = 600) -> None:
    """Run the tests of `test_file` that `-k keyword` selects; exactly `expect` of them must pass (none skip),
    so a filter that selects more or fewer tests than meant fails here."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", keyword],
                       env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    summary = r.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed[1]) == expect, f"expected {expect} passed: {summary}"
