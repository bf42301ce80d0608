"""Running a test file's Triton tests in Triton's interpreter (CPU machines without a GPU).

The interpreter must be switched on before anything imports triton (transformers does), so the
selected tests run in a subprocess with TRITON_INTERPRET=1; inside it, INTERPRETED is true."""
import importlib.util
import os
import subprocess
import sys

import torch

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# the outer test that starts the subprocess runs only on a CPU machine with triton, outside the interpreter
OUTER_ONLY = {"condition": CUDA or INTERPRETED or not HAS_TRITON, "reason": "CPU machine with triton installed only"}


def run_in_interpreter(test_file: str, keyword: str, timeout: int = 600) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", keyword],
                       env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "no tests ran" not in r.stdout, r.stdout[-2000:]
