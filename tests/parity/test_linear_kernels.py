"""The exact linear kernels that the per-machine timing may choose give F.linear's results up to float
rounding: the compiled float32 product for one or two rows (`gemv`), with its fused bias, GELU and residual."""

import pytest
import torch
import torch.nn.functional as F

from service.model import kernels
from service.model.linear import KernelChoice, Linear

GEMV = kernels.gemv()
pytestmark = pytest.mark.skipif(GEMV is None, reason="no C++ compiler here: F.linear serves alone")


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("shape", [(200, 72), (768, 2304), (3072, 768)])  # 200: not a multiple of the vectors
def test_gemv_equals_f_linear(rows, shape):
    torch.manual_seed(rows)
    k, n = shape
    weight, bias = torch.randn(n, k), torch.randn(n)
    x, residual = torch.randn(rows, k), torch.randn(rows, n)
    product = F.linear(x, weight, bias)
    cases = [
        ("", None, product),
        ("tanh", None, F.gelu(product, approximate="tanh")),
        ("", residual, product + residual),
    ]
    for gelu, add, expected in cases:
        got = GEMV.linear_small(x, weight, bias, gelu, add)
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (GEMV.linear_small(x, weight, None, "", None) - F.linear(x, weight)).abs().max() <= 1e-5 * k**0.5
    assert GEMV.linear_small(x[:0], weight, bias, "", None).shape == (0, n)  # no rows: nothing read or written


def test_a_linear_on_gemv_falls_back_to_f_linear_from_three_rows():
    torch.manual_seed(0)
    m = Linear(64, 48)
    m.use(KernelChoice("gemv", "aten"))
    for rows in (1, 2, 3, 15):
        x, residual = torch.randn(rows, 64), torch.randn(rows, 48)
        expected = F.gelu(F.linear(x, m.weight, m.bias), approximate="tanh")
        assert (m(x, activation="gelu_new") - expected).abs().max() <= 1e-5
        assert (m(x, residual=residual) - (F.linear(x, m.weight, m.bias) + residual)).abs().max() <= 1e-5
        silu = m(x, activation="silu")  # not fused: applied after the product
        assert (silu - F.silu(F.linear(x, m.weight, m.bias))).abs().max() <= 1e-5


@pytest.mark.parametrize("rows", [1, 2])
def test_the_screened_greedy_head_is_the_argmax_of_gemv(rows):
    """greedy_head's token is the first argmax of linear_small's logits, exactly: on random heads, with rows
    the bfloat16 screen cannot tell apart (a copy of the best row, and one a float32 ulp away), ties (the
    first index wins), a zero input (every row a candidate); -1 for a NaN input."""
    torch.manual_seed(rows)
    vocab, k = 5000, 200  # k: not a multiple of the vectors
    weight = torch.randn(vocab, k) * 0.05
    for scale in (0.1, 1.0, 30.0):
        x = torch.randn(rows, k) * scale
        expected = GEMV.linear_small(x, weight, None, "", None).max(dim=-1).indices
        assert torch.equal(GEMV.greedy_head(x, weight, weight.to(torch.bfloat16)), expected)
    x = torch.randn(rows, k)
    best = GEMV.linear_small(x, weight, None, "", None)[0].argmax().item()
    near = weight.clone()
    near[7] = weight[best]  # a tie, earlier: index 7 wins
    near[4000] = torch.nextafter(weight[best], weight[best] * 2)  # larger by one ulp: bf16 rounds it equal
    logits = GEMV.linear_small(x, near, None, "", None)
    got = GEMV.greedy_head(x, near, near.to(torch.bfloat16))
    assert torch.equal(got, logits.max(dim=-1).indices) and got[0].item() in (7, 4000)
    assert GEMV.greedy_head(torch.zeros(rows, k), near, near.to(torch.bfloat16)).tolist() == [0] * rows
    x[0, 3] = float("nan")
    assert GEMV.greedy_head(x, weight, weight.to(torch.bfloat16))[0].item() == -1
