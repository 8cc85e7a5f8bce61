"""Shared pytest setup: the `gpu` marker (tests that need CUDA; each also skips itself when no GPU is present)."""

def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (skipped on CPU-only machines)")
