"""Sampler: greedy at T=0, mixed batches, and the sampled distribution equals softmax(logits / T)."""
import pytest
import torch

from nanovllm_lit.layers.sampler import Sampler


@pytest.fixture
def sampler():
    torch.manual_seed(0)
    return Sampler()


def test_greedy_when_temperature_zero(sampler):
    logits = torch.randn(64, 100)
    for _ in range(5):
        out = sampler(logits, torch.zeros(64))
        assert out.dtype == torch.int64 and out.shape == (64,)
        assert torch.equal(out, logits.argmax(-1))


def test_mixed_batch(sampler):
    B, V = 32, 50
    logits = torch.randn(B, V)
    temps = torch.tensor([0.0, 1.0] * (B // 2))
    greedy_rows, sampled_rows = temps == 0, temps > 0
    draws = torch.stack([sampler(logits, temps) for _ in range(50)])  # (50, B)
    assert (draws[:, greedy_rows] == logits.argmax(-1)[greedy_rows]).all()
    # sampled rows are not stuck on the argmax (V = 50 near-uniform tokens at T = 1)
    assert (draws[:, sampled_rows] != logits.argmax(-1)[sampled_rows]).any()
    assert ((draws >= 0) & (draws < V)).all()


def test_does_not_modify_logits_and_accepts_half(sampler):
    logits = torch.randn(4, 10)
    before = logits.clone()
    sampler(logits, torch.tensor([0.5, 1.0, 2.0, 0.0]))
    assert torch.equal(logits, before)  # nano-vllm's in-place div_ would change the caller's logits
    out = sampler(logits.bfloat16(), torch.tensor([0.0, 0.0, 0.0, 0.0]))
    assert torch.equal(out, logits.bfloat16().float().argmax(-1))


def test_tiny_temperature_is_greedy(sampler):
    logits = torch.randn(16, 30)
    assert torch.equal(sampler(logits, torch.full((16,), 1e-4)), logits.argmax(-1))


def test_graph_friendly(sampler):
    "No Python branch on tensor values and no host sync: forward traces symbolically, with no .item()."
    from nanovllm_lit.layers.sampler import sample
    graph = torch.fx.symbolic_trace(sample.__wrapped__).graph  # the plain function (compiled only on CUDA)
    assert not [n for n in graph.nodes if n.target in ("item", "tolist", "cpu", "numpy")]


def _chi2_quantile(p, df):
    "Chi-square p-quantile: bisection on the CDF P(df/2, x/2) = torch.special.gammainc."
    lo, hi, a = 0.0, 10.0 * df + 100.0, torch.tensor(df / 2, dtype=torch.float64)
    for _ in range(60):
        mid = (lo + hi) / 2
        if torch.special.gammainc(a, torch.tensor(mid / 2, dtype=torch.float64)) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def test_chi2_quantile_matches_tables():
    # NIST/SEMATECH e-Handbook of Statistical Methods, table 1.3.6.7.4 (upper-tail critical values)
    assert abs(_chi2_quantile(0.999, 7) - 24.322) < 1e-3
    assert abs(_chi2_quantile(0.95, 5) - 11.070) < 1e-3


@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
def test_distribution_matches_softmax(sampler, T):
    V, n = 10, 20_000
    logits = torch.linspace(1.5, -1.5, V)
    if T == 0.5:
        logits = logits * 0.6  # keep every expected count well above 5
    tokens = sampler(logits.expand(n, V), torch.full((n,), T))
    counts = torch.bincount(tokens, minlength=V).double()
    expected = n * torch.softmax(logits.double() / T, -1)
    assert expected.min() > 5
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < _chi2_quantile(0.999, V - 1), stat


def test_per_row_temperature_distribution(sampler):
    "Rows of one batch with different temperatures each follow their own softmax."
    V, n = 4, 8_000
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5])
    temps = torch.tensor([0.5, 2.0]).repeat_interleave(n)
    tokens = sampler(logits.expand(2 * n, V), temps).view(2, n)
    for row, T in zip(tokens, (0.5, 2.0)):
        counts = torch.bincount(row, minlength=V).double()
        expected = n * torch.softmax(logits.double() / T, -1)
        assert float(((counts - expected) ** 2 / expected).sum()) < _chi2_quantile(0.999, V - 1)


_SAMPLER_FOR_HOPPER = r'''
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from nanovllm_lit.layers import sampler_triton as s
assert not s.INTERPRET
fn = s._gumbel_sample_kernel
for seed_ptr in (False, True):
    for copy in (False, True):
        types = dict(logits_ptr="*bf16", stride="i32", temps_ptr="*fp32", out_ptr="*i64",
                     seed="*i32" if seed_ptr else "i32", copy_ptr="*bf16", V="i32", greedy_below="fp32",
                     BLOCK="constexpr", SEED_PTR="constexpr", COPY="constexpr")
        triton.compile(ASTSource(fn=fn, signature={n: types[n] for n in fn.arg_names},
                                 constexprs=dict(BLOCK=2048, SEED_PTR=seed_ptr, COPY=copy)),
                       target=GPUTarget("cuda", 90, 32))
print("compiled")
'''


def test_sampler_kernel_passes_tritons_compiler_for_hopper(triton_for_hopper):
    "Chapter 14b's kernel with the seed read from memory and the logits copy (graphs, chapter 08) compiles for sm_90."
    assert "compiled" in triton_for_hopper(_SAMPLER_FOR_HOPPER)
