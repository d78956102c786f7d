"""Inference in row bands (``metaloss.fusion.bands``): the blocks give the whole image's values
band by band, for any band height, layout, batch and precision; training never bands."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn

from metaloss.fusion import LossGenerator, ReFusion, networks
from metaloss.fusion.bands import BandedTensor, RowBand, band_rows, row_bands, whole_images
from metaloss.fusion.networks import AdaptiveFusion, RestormerBlock


@pytest.mark.parametrize("height", [1, 2, 5, 31, 32, 33, 64])
@pytest.mark.parametrize("rows", [1, 2, 3, 32, 100])
def test_row_bands_cover_each_row_once_with_their_halos(height: int, rows: int) -> None:
    bands = row_bands(height, rows)
    assert [r for b in bands for r in range(b.start, b.stop)] == list(range(height))
    for band in bands:
        assert 0 < band.stop - band.start <= rows
        assert (band.lo, band.hi) == (max(0, band.start - 1), min(height, band.stop + 1))
        assert band.core.stop - band.core.start == band.stop - band.start


def test_row_bands_refuse_a_band_of_no_rows() -> None:
    with pytest.raises(ValueError, match="rows must be at least 1"):
        row_bands(10, 0)


def test_a_single_band_is_kept_without_a_copy() -> None:
    values = torch.rand(1, 3, 4, 5)
    banded = BandedTensor(4, torch.contiguous_format)
    (band,) = row_bands(4, 4)
    banded.write(values, band)
    assert banded.tensor is values


def _in_bands_of(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bands of ``rows`` rows at inference, whatever the input's size and layout."""
    monkeypatch.setattr(networks, "band_rows", lambda width, batch=1: rows)
    monkeypatch.setattr(networks, "worth_banding", lambda x: True)


def _random_weights(module: nn.Module, seed: int) -> nn.Module:
    """Weights far from the initial ones (ones, zeros), so that every layer matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 3 else 0.0))
    return module.eval()


def _both_ways(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], rows: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """``module(*inputs)`` in bands of ``rows`` rows and on the whole image, without a graph."""
    with torch.no_grad():
        with whole_images():
            whole = module(*inputs)
        _in_bands_of(rows, monkeypatch)
        banded = module(*inputs)
    return banded, whole


@pytest.mark.parametrize("rows", [1, 2, 7, 16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize(("batch", "size"), [(1, (33, 40)), (2, (20, 13))])
def test_a_block_in_bands_gives_the_whole_image_values(
    rows: int, channels_last: bool, batch: int, size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Restormer block band by band: the whole image's output within float32 rounding (the
    attention's sums blocked per band), in the input's layout."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    block = _random_weights(RestormerBlock(16), 0).to(memory_format=layout)
    x = torch.randn(batch, 16, *size, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=layout)
    banded, whole = _both_ways(block, (x,), rows, monkeypatch)
    assert banded.is_contiguous(memory_format=layout)
    assert float((banded - whole).abs().max()) <= 1e-6 * float(whole.abs().max())


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_the_fusion_module_in_bands_gives_the_whole_image_values(
    rows: int, channels_last: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = torch.channels_last if channels_last else torch.contiguous_format
    module = _random_weights(AdaptiveFusion(16), 2).to(memory_format=layout)
    g = torch.Generator().manual_seed(3)
    x1, x2 = (torch.randn(2, 16, 23, 17, generator=g).contiguous(memory_format=layout) for _ in range(2))
    banded, whole = _both_ways(module, (x1, x2), rows, monkeypatch)
    assert float((banded - whole).abs().max()) <= 1e-6 * float(whole.abs().max())


def test_the_loss_generator_in_bands_gives_the_whole_image_values(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(4)
    generator = LossGenerator().eval()  # its own initial weights: random ones saturate its softmax
    g = torch.Generator().manual_seed(5)
    a, b = (torch.rand(1, 1, 30, 24, generator=g) for _ in range(2))
    banded, whole = _both_ways(generator, (a, b), 4, monkeypatch)
    assert float((banded - whole).abs().max()) <= 1e-6


def test_bands_under_bf16_autocast_stay_within_bf16_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    block = _random_weights(RestormerBlock(16), 6)
    x = torch.randn(1, 16, 40, 24, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        float32 = block(x)
    _in_bands_of(6, monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = block(x)
    assert float((bf16.float() - float32).abs().max() / float32.abs().max()) < 3e-2


def test_training_never_bands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a graph is recorded the blocks run on the whole image: the same values, bit for bit,
    as with bands turned off."""
    model = _random_weights(ReFusion(), 8).train()
    x = torch.rand(1, 2, 24, 20, generator=torch.Generator().manual_seed(9))
    with whole_images():
        whole = model(x)
    _in_bands_of(3, monkeypatch)
    recorded = model(x)
    assert recorded.requires_grad and torch.equal(recorded, whole)


def test_a_forward_mode_derivative_never_bands(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward-mode derivative without a graph (``torch.no_grad`` with dual inputs) runs on the
    whole image (the bands write in place, which forward mode does not support): the product is
    the same as with bands turned off."""
    model = _random_weights(ReFusion(), 10)
    g = torch.Generator().manual_seed(11)
    x, tangent = (torch.rand(1, 2, 24, 20, generator=g) for _ in range(2))

    def product() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), forward_ad.dual_level():
            out = forward_ad.unpack_dual(model(forward_ad.make_dual(x, tangent)))
            assert out.tangent is not None
            return out.primal, out.tangent

    with whole_images():
        whole = product()
    _in_bands_of(3, monkeypatch)
    banded = product()
    assert all(torch.equal(a, b) for a, b in zip(banded, whole, strict=True))


def _counting_band_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The class name of each module that runs ``_forward_in_bands`` from now on, in order."""
    calls: list[str] = []
    for cls in (RestormerBlock, AdaptiveFusion):

        def counted(self: nn.Module, *inputs: torch.Tensor, _original=cls._forward_in_bands) -> torch.Tensor:
            calls.append(type(self).__name__)
            return _original(self, *inputs)  # type: ignore[arg-type]

        monkeypatch.setattr(cls, "_forward_in_bands", counted)
    return calls


@pytest.mark.parametrize(
    ("size", "channels_last", "expected"),
    [
        ((288, 288), True, ["RestormerBlock"] * 4 + ["AdaptiveFusion"] + ["RestormerBlock"] * 2),
        ((288, 288), False, ["RestormerBlock"] * 2 + ["AdaptiveFusion"] + ["RestormerBlock"] * 2),
        ((256, 256), True, []),
    ],
    ids=["large-NHWC", "large-NCHW", "small-NHWC"],
)
def test_only_large_channels_last_inputs_run_in_bands(
    size: tuple[int, int], channels_last: bool, expected: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At inference a block bands where it was measured to pay: a channels-last input of at least
    ``MIN_BANDED_PIXELS`` (288^2 is above, 256^2 below). In the default layout the first block of
    each encoder gets the channel-major input and runs whole; every block after it gets the
    channels-last output of a ``ChannelLayerNorm`` and bands."""
    calls = _counting_band_calls(monkeypatch)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = ReFusion().eval().to(memory_format=layout)
    with torch.no_grad():
        model(torch.rand(1, 2, *size).contiguous(memory_format=layout))
    assert calls == expected


def test_whole_images_turns_bands_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside ``whole_images`` no block bands, even a large channels-last input; after it they do."""
    calls = _counting_band_calls(monkeypatch)
    model = ReFusion().eval().to(memory_format=torch.channels_last)
    x = torch.rand(1, 2, 288, 288).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with whole_images():
            model(x)
        assert calls == []
        model(x)
    assert len(calls) == 7


def test_a_batch_is_cut_into_bands_of_about_as_many_pixels_as_one_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """A band holds about ``ROW_BAND_PIXELS`` pixels across the batch (a batch of 4 pairs at
    512^2 costs a pair what one pair does, ``docs/benchmarks.md``): half the rows of one image's
    bands for a batch of 2, with the whole images' values."""
    rows_asked: list[int] = []
    real = networks.row_bands

    def recording_row_bands(height: int, rows: int) -> list[RowBand]:
        rows_asked.append(rows)
        return real(height, rows)

    monkeypatch.setattr(networks, "row_bands", recording_row_bands)
    block = _random_weights(RestormerBlock(16), 0).to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 288, 288, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        banded = block(x)
        assert rows_asked == [band_rows(288) // 2] == [36]
        with whole_images():
            whole = block(x)
    assert float((banded - whole).abs().max()) <= 1e-6 * float(whole.abs().max())
