"""Fusion building blocks: the released weights reproduce the authors' outputs; the attention's
derivatives; loss forms."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from metaloss import InnerSGD, MetaStep
from metaloss.fusion import (
    GradientTerm,
    LossGenerator,
    ReFusion,
    gradient_loss,
    intensity_loss,
    load_released_weights,
    networks,
    sobel,
    tdfusion_loss,
)
from metaloss.fusion.bands import BAND_PIXELS
from metaloss.fusion.image_io import blend_chroma, read_grey, read_ycrcb
from metaloss.fusion.networks import (
    _banded_attention,
    _cosine_gram,
    _projected_attention,
    _transposed_attention,
)
from metaloss.meta_step import SecondOrder


def test_parameter_counts_match_the_paper() -> None:
    assert sum(p.numel() for p in ReFusion().parameters()) == 59_856
    assert sum(p.numel() for p in LossGenerator().parameters()) == 44_529


@pytest.mark.parametrize(
    ("dtype", "precise", "tolerance"),
    [(torch.float64, True, 1e-5), (torch.float32, True, 1e-5), (torch.float32, False, 5e-5)],
)
def test_released_weights_reproduce_released_outputs(
    shared_data: Path, dtype: torch.dtype, precise: bool, tolerance: float
) -> None:
    """Within 1e-5 in float64 and in float32 (measured: 9.5e-7 and 1.1e-6); float32 needs the
    attention's 307,200-pixel reductions accumulated in float64 (1.9e-5 without)."""
    root = shared_data / "ReFusion"
    model = load_released_weights(ReFusion(precise_attention=precise), root / "ReFusion_IVIF.pth").eval().to(dtype)
    reference = np.load(root / "ivif_raw_outputs.npz")
    # float64 is slow on 2 cores (19 s a pair): one pair, the one float32 fits worse.
    names = ["00906N"] if dtype == torch.float64 else list(reference)
    for name in names:
        a = read_ycrcb(root / "test_cases/IVIF/infrared" / f"{name}.png")[..., 0] / 255
        b = read_ycrcb(root / "test_cases/IVIF/visible" / f"{name}.png")[..., 0] / 255
        x = torch.from_numpy(np.stack([a, b])[None]).to(dtype)
        with torch.no_grad():
            out = model(x)[0, 0].double().numpy()
        assert np.abs(out - reference[name]).max() <= tolerance, name


def _normalised_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, t: torch.Tensor
) -> torch.Tensor:
    """The textbook form: float64 copies of q and k, normalised, then their Gram matrix."""
    b, c, h, w = q.shape
    q, k, v = (x.reshape(b, heads, c // heads, h * w) for x in (q, k, v))
    q64 = torch.nn.functional.normalize(q.double(), dim=-1)
    k64 = torch.nn.functional.normalize(k.double(), dim=-1)
    attn = ((q64 @ k64.transpose(-2, -1)).float() * t).softmax(dim=-1)
    return (attn @ v).reshape(b, c, h, w)


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["graph", "no-graph"])
def test_precise_attention_matches_the_textbook_form(grad_enabled: bool) -> None:
    """The Gram matrix divided by the norms, with its own backward and forward-mode derivative
    where a graph is recorded, against autograd through the textbook form: the output, the
    gradient, the second derivative and the forward-mode product, to float32 rounding."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 16, 12, 10, requires_grad=grad_enabled) for _ in range(3))
    t = torch.rand(8, 1, 1) + 0.5
    inputs = (q, k, v)
    tangents = tuple(torch.randn_like(x) for x in inputs)
    results = []
    forms: list[Callable[..., torch.Tensor]] = [_normalised_attention, _transposed_attention]
    for attention in forms:
        with torch.autograd.set_grad_enabled(grad_enabled), torch.autograd.forward_ad.dual_level():
            duals = tuple(torch.autograd.forward_ad.make_dual(x, d) for x, d in zip(inputs, tangents, strict=True))
            out, product = torch.autograd.forward_ad.unpack_dual(attention(*duals, 8, t))
        row = [out.detach(), product.detach()]
        if grad_enabled:
            out = attention(q, k, v, 8, t)
            grads = torch.autograd.grad((out * out.detach().sin()).sum(), inputs, create_graph=True)
            row += [g.detach() for g in grads]
            curvature = torch.stack([(g**2 * g.detach().cos()).sum() for g in grads]).sum()
            row += torch.autograd.grad(curvature, inputs)
        results.append(row)
    # The second derivatives pass through more operations in a different order: some ulps more of
    # their largest entry (1.6e-6 of it on a CPU with AMX, against 8e-8 for the first derivatives).
    for i, (ours, textbook) in enumerate(zip(results[1], results[0], strict=True)):
        scale = 1e-5 if i >= 5 else 1e-6
        torch.testing.assert_close(ours, textbook, rtol=1e-5, atol=scale * float(textbook.abs().max()))


def test_precise_attention_keeps_its_float32_inputs_for_the_backward() -> None:
    """The graph holds q and k themselves, not float64 copies: changing them in place after the
    forward is caught by autograd's version check (a copy would hide the change)."""
    q, k = (torch.randn(1, 2, 4, 30, requires_grad=True) * 1 for _ in range(2))
    out = _cosine_gram(q, k, torch.float64)
    assert out.dtype == torch.float64
    with torch.no_grad():
        q.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
def test_meta_gradient_through_the_float32_networks_matches_the_textbook_attention(
    monkeypatch: pytest.MonkeyPatch, checkpointing: bool
) -> None:
    """ReFusion and TDFusion's generator in float32 under a meta step: the meta-gradient taken
    through the forward-mode product (eager and compiled by ``torch.compile``) and through the
    double backward (all through ``_WideCosineGram``) equals the one taken by autograd through
    the textbook attention."""
    torch.manual_seed(0)
    model, loss = ReFusion(), tdfusion_loss(LossGenerator())
    task = torch.nn.Conv2d(1, 3, 3, padding=1)
    batch = {"a": torch.rand(2, 1, 16, 16), "b": torch.rand(2, 1, 16, 16), "mask": torch.randint(0, 3, (2, 16, 16))}

    def meta_gradient(second_order: SecondOrder) -> torch.Tensor:
        meta = MetaStep(
            model,
            loss,
            task,
            lambda out, b: torch.nn.functional.cross_entropy(out, b["mask"]),
            inner=InnerSGD(0.5),
            task_inner=InnerSGD(0.5),
            second_order=second_order,
            activation_checkpointing=checkpointing,
        )
        result, _ = meta.hypergradient(batch, batch)
        return torch.cat([g.flatten() for g in result.grads])

    ours = [meta_gradient("jvp"), meta_gradient("compiled_jvp"), meta_gradient("double_backward")]
    monkeypatch.setattr(
        networks, "_transposed_attention", lambda q, k, v, heads, t, precise: _normalised_attention(q, k, v, heads, t)
    )
    textbook = meta_gradient("double_backward")
    assert textbook.norm() > 0
    for gradient in ours:
        assert float((gradient - textbook).norm() / textbook.norm()) < 1e-5


def _textbook_projected(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """The projected attention plus its residual, all in float64 by the textbook form."""
    q, k, v = (x.double() for x in (q, k, v))
    attended = _normalised_attention(q, k, v, 8, t.double())
    return residual.double() + torch.nn.functional.conv2d(attended, weight.double())


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize(
    "size",
    [(7, 5), (64, BAND_PIXELS // 64), (67, 71)],
    ids=["under-one-band", "one-band-exactly", "bands-and-a-remainder"],
)
@pytest.mark.parametrize(("batch", "channels"), [(1, 32), (2, 16)])
@pytest.mark.parametrize(("precise", "tolerance"), [(True, 1e-6), (False, 1e-5)], ids=["precise", "float32"])
def test_inference_attention_matches_the_textbook_form(
    channels_last: bool, size: tuple[int, int], batch: int, channels: int, precise: bool, tolerance: float
) -> None:
    """The inference order (the attention summed in float32 bands, the projection and the residual
    folded in): the float64 textbook value within float32 rounding, for either memory layout
    (kept in the output), whole bands or not, any batch."""
    g = torch.Generator().manual_seed(0)
    q, k, v, residual = (torch.randn(batch, channels, *size, generator=g) + 0.3 for _ in range(4))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    q, k, v, residual = (x.contiguous(memory_format=layout) for x in (q, k, v, residual))
    t, weight = torch.rand(8, 1, 1, generator=g) + 0.5, torch.randn(channels, channels, 1, 1, generator=g)
    ours = _banded_attention(q, k, v, 8, t, weight, residual, precise)
    textbook = _textbook_projected(q, k, v, t, weight, residual)
    assert ours.dtype == torch.float32 and ours.is_contiguous(memory_format=layout)
    assert float((ours.double() - textbook).abs().max() / textbook.abs().max()) < tolerance


def test_attention_takes_the_inference_order_only_where_no_graph_is_recorded() -> None:
    g = torch.Generator().manual_seed(2)
    q, k, v, residual = (torch.randn(1, 16, 30, 20, generator=g) for _ in range(4))
    t, weight = torch.rand(8, 1, 1, generator=g) + 0.5, torch.randn(16, 16, 1, 1, generator=g, requires_grad=True)
    banded = _banded_attention(q, k, v, 8, t, weight, residual).detach()
    textbook = (residual + torch.nn.functional.conv2d(_transposed_attention(q, k, v, 8, t), weight)).detach()
    assert not torch.equal(banded, textbook)  # the two orders round differently
    with torch.no_grad():
        assert torch.equal(_projected_attention(q, k, v, 8, t, weight, residual), banded)
    recorded = _projected_attention(q, k, v, 8, t, weight, residual)
    assert recorded.requires_grad and torch.equal(recorded.detach(), textbook)


def test_inference_attention_under_bf16_autocast_sums_in_float32() -> None:
    """Under CPU bf16 autocast the whole-image sums still run in float32 and float64: the result
    stays within bf16 rounding of the float64 textbook value."""
    g = torch.Generator().manual_seed(1)
    q, k, v, residual = (torch.randn(1, 16, 40, 120, generator=g) for _ in range(4))
    t, weight = torch.rand(8, 1, 1, generator=g) + 0.5, torch.randn(16, 16, 1, 1, generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        qb, kb, vb, rb = (x.bfloat16() for x in (q, k, v, residual))
        ours = _projected_attention(qb, kb, vb, 8, t, weight, rb)
    textbook = _textbook_projected(q, k, v, t, weight, residual)
    assert float((ours.double() - textbook).abs().max() / textbook.abs().max()) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels", [16, 32, 64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_gelu_of_a_gate_view_is_gelu(dtype: torch.dtype, channels: int, channels_last: bool) -> None:
    """The feed-forward's GELU of one half of a map (a strided view; a bf16 one is copied dense
    first) gives ``F.gelu``'s values to the bit, and the same gradient."""
    g = torch.Generator().manual_seed(2)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 2 * channels, 5, 7, generator=g).to(dtype).contiguous(memory_format=layout)
    x.requires_grad_(True)
    gate = x.chunk(2, dim=1)[0]
    ours, reference = networks._gelu(gate), torch.nn.functional.gelu(gate)
    assert ours.dtype == dtype and torch.equal(ours, reference)
    (grad_ours,) = torch.autograd.grad(ours.float().sum(), x)
    (grad_reference,) = torch.autograd.grad(reference.float().sum(), x)
    assert torch.equal(grad_ours, grad_reference)


def test_refusion_under_bf16_autocast_uses_dense_gates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CPU bf16 autocast every GELU of ReFusion's gates runs on a dense map (PyTorch's CPU
    kernel is 8-10x slower on a strided bf16 view), and the output is the one
    ``F.gelu`` on the views gives."""
    seen: list[bool] = []
    gelu = torch.nn.functional.gelu

    def recording(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        return gelu(x)

    model = ReFusion().eval().to(memory_format=torch.channels_last)
    x = torch.rand(1, 2, 24, 32, generator=torch.Generator().manual_seed(3))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(networks.F, "gelu", recording)
        ours = model(x)
        monkeypatch.setattr(networks, "_gelu", gelu)
        reference = model(x)
    assert len(seen) == 8 and all(seen)  # 6 feed-forwards, the fusion module's 2 gates
    assert torch.equal(ours, reference)


def test_channel_major_copy_of_qkv_is_the_same_map() -> None:
    """The graph path's channel-major copy of a channels-last ``qkv`` map: the same values,
    contiguous, and gradients and tangents passed through as ``Tensor.contiguous`` passes them
    (first and second order); a map without a graph, or already channel-major, is left as it is."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 61, 67, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert networks._channel_major_where_recorded(x) is x  # no graph recorded
    x.requires_grad_(True)
    y = networks._channel_major_where_recorded(x)
    assert y is not x and y.is_contiguous() and torch.equal(y, x)
    assert networks._channel_major_where_recorded(y) is y  # already channel-major
    small = x.detach()[:, :3, :5, :4].contiguous(memory_format=torch.channels_last).requires_grad_(True)
    squared = lambda t: networks._channel_major_where_recorded(t) ** 2  # noqa: E731
    assert torch.autograd.gradcheck(squared, (small,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(squared, (small,))


@pytest.mark.parametrize("network", ["ReFusion", "LossGenerator"])
def test_channel_major_qkv_leaves_training_bit_for_bit(network: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a graph recorded, the attention's ``qkv`` maps are copied channel-major whole (a speed
    choice): the outputs and every parameter's gradient are those of the per-head copies, to the bit."""
    torch.manual_seed(5)
    model = ReFusion() if network == "ReFusion" else LossGenerator()
    a, b = torch.rand(2, 1, 40, 48), torch.rand(2, 1, 40, 48)
    inputs = (torch.cat([a, b], 1),) if network == "ReFusion" else (a, b)
    copied: list[bool] = []
    transpose = networks._ChannelMajor.apply

    def recording(x: torch.Tensor) -> torch.Tensor:
        copied.append(True)
        out: torch.Tensor = transpose(x)
        return out

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model(*inputs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    monkeypatch.setattr(networks._ChannelMajor, "apply", recording)
    ours = step()
    monkeypatch.setattr(networks, "_channel_major_where_recorded", lambda qkv: qkv)
    reference = step()
    assert copied  # the copy ran
    assert torch.equal(ours[0], reference[0])
    assert all(torch.equal(x, y) for x, y in zip(ours[1], reference[1], strict=True))


@pytest.mark.parametrize("band_rows", [None, 7], ids=["one-band", "bands-of-7-rows"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_refusion_infers_what_it_trains_on(
    shared_data: Path, channels_last: bool, band_rows: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The released ReFusion on an MSRS pair (120 x 160): the inference order (no graph; one band
    at this size, or bands of 7 rows, not a whole number of the sums' blocks) and the training
    order (a graph recorded) give the same image within 1e-6."""
    if band_rows is not None:
        monkeypatch.setattr(networks, "band_rows", lambda width, batch=1: band_rows)
        monkeypatch.setattr(networks, "worth_banding", lambda x: True)
    model = load_released_weights(ReFusion(), shared_data / "ReFusion" / "ReFusion_IVIF.pth").eval()
    a = read_ycrcb(shared_data / "ReFusion/test_cases/IVIF/infrared/00906N.png")[..., 0] / 255
    b = read_ycrcb(shared_data / "ReFusion/test_cases/IVIF/visible/00906N.png")[..., 0] / 255
    x = torch.from_numpy(np.stack([a, b])[None]).float()
    x = torch.nn.functional.interpolate(x, size=(120, 160), mode="area")
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        inferred = model(x)
    trained = model(x).detach()  # the parameters require grad: the graph-recording order
    assert float((inferred - trained).abs().max()) < 1e-6


def test_released_medical_weights_load(shared_data: Path) -> None:
    model = load_released_weights(ReFusion(), shared_data / "ReFusion/ReFusion_MIF.pth")
    mri = read_grey(shared_data / "ReFusion/test_cases/MIF/MRI/MRI_PET_14.png") / 255
    pet = read_ycrcb(shared_data / "ReFusion/test_cases/MIF/CT_PET_SPECT/MRI_PET_14.png")[..., 0] / 255
    with torch.no_grad():
        out = model(torch.from_numpy(np.stack([mri, pet])[None]).float())
    assert out.shape == (1, 1, *mri.shape) and 0 < out.min() and out.max() < 1


def test_loader_names_the_bad_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_released_weights(ReFusion(), tmp_path / "missing.pth")
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth does not fit ReFusion"):
        load_released_weights(ReFusion(), tmp_path / "bad.pth")


def test_loader_reads_our_own_checkpoints(tmp_path: Path) -> None:
    model = ReFusion()
    torch.save({"model": model.state_dict(), "position": {}}, tmp_path / "last.pt")
    other = load_released_weights(ReFusion(), tmp_path / "last.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_sobel_matches_hand_computation() -> None:
    image = torch.zeros(1, 1, 5, 5)
    image[..., :, 3:] = 1.0  # a vertical edge
    gx, gy = sobel(image)
    assert gx[0, 0, 2, 2].item() == 4.0 and gx[0, 0, 2, 3].item() == 4.0 and gx[0, 0, 2, 0].item() == 0.0
    assert torch.all(gy[0, 0, 1:-1] == 0)


def test_intensity_forms() -> None:
    g = torch.Generator().manual_seed(0)
    f, a, b = (torch.rand(2, 1, 6, 6, generator=g) for _ in range(3))
    w = torch.softmax(torch.randn(2, 2, 6, 6, generator=g), dim=1)
    paper = (w[:, :1] * (f - a) ** 2 + w[:, 1:] * (f - b) ** 2).mean()
    released = ((w[:, :1] * (a - f)) ** 2).mean() + ((w[:, 1:] * (b - f)) ** 2).mean()
    torch.testing.assert_close(intensity_loss(f, [a, b], w, "paper"), paper)
    torch.testing.assert_close(intensity_loss(f, [a, b], w, "released"), released)
    with pytest.raises(ValueError, match="form must be"):
        intensity_loss(f, [a, b], w, "other")  # type: ignore[arg-type]


def test_gradient_forms_are_zero_on_the_strongest_source_only() -> None:
    g = torch.Generator().manual_seed(1)
    strong = torch.rand(1, 1, 8, 8, generator=g)
    flat = torch.zeros(1, 1, 8, 8)  # no gradient anywhere, borders included (zero padding)
    for form in ("paper", "released"):
        assert gradient_loss(strong, [strong, flat], form).item() == pytest.approx(0.0, abs=1e-7)
        assert gradient_loss(flat, [strong, flat], form).item() > 0.1
    # the released form keeps the sign: an inverted copy of the source is penalised, the paper's is not
    inverted = 1 - strong
    inside = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    fx, fy = sobel(inverted)
    sx, sy = sobel(strong)
    torch.testing.assert_close((fx.abs() + fy.abs())[inside], (sx.abs() + sy.abs())[inside])
    assert gradient_loss(inverted, [strong, flat], "released").item() > 0.1


def test_tdfusion_loss_assembles_terms() -> None:
    loss = tdfusion_loss(LossGenerator(dim=8, heads=2), alpha=0.5)
    a, b, f = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    out = loss([a, b], f)
    assert set(out.terms) == {"intensity", "gradient"}
    torch.testing.assert_close(out.total, out.terms["intensity"] + 0.5 * out.terms["gradient"])
    assert isinstance(loss.terms["gradient"], GradientTerm)
    no_grad_term = tdfusion_loss(LossGenerator(dim=8, heads=2), alpha=0.0)
    assert set(no_grad_term.terms) == {"intensity"}


def test_chroma_blend_prefers_the_saturated_source() -> None:
    """Chroma planes of OpenCV's float YCrCb are centred at 0.5: a neutral plane does not count."""
    c1 = np.full((2, 2), 40.5)
    c2 = np.full((2, 2), 0.5)
    np.testing.assert_allclose(blend_chroma(c1, c2), 40.5, atol=1e-3)
    np.testing.assert_allclose(blend_chroma(c1, np.full((2, 2), -39.5)), 0.5, atol=1e-3)  # opposite hues cancel
