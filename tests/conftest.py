"""Shared pytest setup: the `gpu` marker (tests that need CUDA; each also skips itself when no GPU is present), and
`triton_for_hopper`, which runs a script under Triton's real compiler (not the interpreter) to compile kernels for sm_90.
Without a GPU every Triton kernel a test runs goes through the interpreter with `tools/bounds_check.py` on: a masked-in
load or store outside the kernel's tensors fails the test instead of reading stray host memory (BOUNDS_CHECK=0 turns
that off)."""
import os, subprocess, sys
import pytest


@pytest.fixture
def triton_for_hopper():
    "run(script) -> its stdout: the script runs in a fresh interpreter with TRITON_INTERPRET=0 and must exit 0."
    pytest.importorskip("triton.backends.nvidia")                 # Triton ships ptxas: no GPU needed to compile
    def run(script: str) -> str:
        env = {**os.environ, "TRITON_INTERPRET": "0"}             # a real JITFunction, not the interpreter's
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout
    return run


def pytest_configure(config):
    import torch
    if not torch.cuda.is_available() and os.environ.get("BOUNDS_CHECK", "1") == "1":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tools.bounds_check import check_bounds
        check_bounds()
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (skipped on CPU-only machines)")
