"""benchmarks/gpu_check.py where no GPU is: it says so and exits 0 at once; bad arguments exit 2
naming the flag. (Its GPU path runs only where a GPU is lent; see the README.)"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

SCRIPT = str(ROOT / "benchmarks" / "gpu_check.py")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_without_a_gpu_it_says_so_and_exits_zero_at_once():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    start = time.time()
    proc = run()
    assert proc.returncode == 0, proc.stderr
    assert time.time() - start < 60
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ran"] is False and "no CUDA GPU" in result["reason"]


@pytest.mark.parametrize("args, flag", [(["--steps", "3"], "--steps"), (["--peak-tflops", "-5"], "--peak-tflops"),
                                        (["--steps", "many"], "--steps"), (["--bogus"], "--bogus")])
def test_bad_arguments_exit_2_naming_the_flag(args, flag):
    proc = run(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert flag in proc.stderr and "Traceback" not in proc.stderr
