"""The grouped convolution with the loop-free double backward: same values, first and second
derivatives as the native one (float64 gradcheck and gradgradcheck over its options)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaloss.grouped_conv import FastGroupedConv, grouped_conv2d

CASES = [  # (in channels, out channels, groups, stride, padding, dilation, kernel)
    (6, 6, 6, 1, 1, 1, 3),  # depthwise, as in ReFusion and SegFormer
    (6, 9, 3, 2, 1, 1, 3),  # grouped, strided: the transposed convolution needs output padding
    (4, 4, 2, 1, 2, 2, 3),  # dilated
    (6, 12, 6, 2, 0, 1, 2),  # channel multiplier 2, no padding
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_first_and_second_derivatives_match_finite_differences(case: tuple[int, ...], bias: bool) -> None:
    c, o, groups, stride, padding, dilation, k = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, c, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(o, c // groups, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(o, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, w) if b is None else (x, w, b)

    def fn(*args: torch.Tensor) -> torch.Tensor:
        return grouped_conv2d(args[0], args[1], args[2] if len(args) > 2 else None, stride, padding, dilation, groups)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    native = F.conv2d(x, w, b, stride, padding, dilation, groups)
    torch.testing.assert_close(fn(*inputs), native, rtol=0, atol=1e-12)


def _second_order(x: torch.Tensor, w: torch.Tensor, fast: bool) -> tuple[torch.Tensor, str]:
    if fast:
        with FastGroupedConv():
            y = F.conv2d(x, w, None, 1, 1, 1, x.shape[1])
    else:
        y = F.conv2d(x, w, None, 1, 1, 1, x.shape[1])
    gx, gw = torch.autograd.grad((y**2).sum(), (x, w), create_graph=True)
    return torch.autograd.grad((gx**2).sum() + (gw**3).sum(), w)[0], type(y.grad_fn).__name__


def test_the_mode_routes_grouped_convolutions_and_gives_the_native_second_derivative() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    native, native_fn = _second_order(x, w, fast=False)
    fast, fast_fn = _second_order(x, w, fast=True)
    assert fast_fn != native_fn and "GroupedConv2d" in fast_fn
    torch.testing.assert_close(fast, native, rtol=1e-10, atol=1e-10)
    with FastGroupedConv():  # an ungrouped convolution is left to the native kernel
        y = F.conv2d(x, torch.randn(3, 5, 3, 3, dtype=torch.float64))
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0"


def test_under_autocast_it_computes_in_the_autocast_dtype_like_the_native_one() -> None:
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    w = torch.randn(8, 1, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native = F.conv2d(x, w, None, 1, 1, 1, 8)
        with FastGroupedConv():
            fast = F.conv2d(x, w, None, 1, 1, 1, 8)
    assert fast.dtype == native.dtype == torch.bfloat16
    torch.testing.assert_close(fast, native, rtol=0, atol=0)
    gx, gw = torch.autograd.grad(fast.float().square().sum(), (x, w), create_graph=True)
    assert gx.dtype == gw.dtype == torch.float32
    (hw,) = torch.autograd.grad(gx.square().sum(), w)
    assert hw.dtype == torch.float32 and bool(torch.isfinite(hw).all())
