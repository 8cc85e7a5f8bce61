"""`tools/bounds_check.py`, which conftest turns on for every interpreted Triton kernel on machines without a GPU."""
import os
import pytest, torch

if not torch.cuda.is_available(): os.environ.setdefault("TRITON_INTERPRET", "1")     # as chapter 10a does

triton = pytest.importorskip("triton")
import triton.language as tl

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the check patches Triton's CPU interpreter")


@triton.jit
def _copy(x, y, n, B: tl.constexpr):
    o = tl.arange(0, B)
    tl.store(y + o, tl.load(x + o, mask=o < n), mask=o < n)


def test_in_bounds_runs():
    x, y = torch.arange(8.0), torch.zeros(8)
    _copy[(1,)](x, y, 8, B=16)                          # lanes 8..15 are masked off: never checked, never read
    assert torch.equal(x, y)


def test_load_past_the_end_fails():
    x, y = torch.arange(8.0), torch.zeros(16)          # y is large enough: only the load of x[8] is out of bounds
    with pytest.raises(Exception, match="_copy: load of 1 masked-in address"):
        _copy[(1,)](x, y, 9, B=16)


def test_store_past_the_end_fails():
    x, y = torch.arange(16.0), torch.zeros(8)
    with pytest.raises(Exception, match="_copy: store of 2 masked-in address"):
        _copy[(1,)](x, y, 10, B=16)


def test_views_are_checked_against_their_storage():
    "A view may be read past its own end but inside its storage: the check is per storage, as the docstring says."
    base, y = torch.arange(16.0), torch.zeros(16)
    _copy[(1,)](base[:8], y, 12, B=16)
    assert torch.equal(y[:12], base[:12])
