"""Activation checkpointing inside networks that a meta step runs with virtual parameters:
``checkpointed_call`` recomputes with the parameters the forward pass used; a library's own
checkpointing (SegFormer's ``activation_checkpointing_enable()``) is refused by name; ReFusion's and
the loss generator's ``checkpoint_blocks`` keep less and give the same meta-gradient."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from metaloss import InnerSGD, MetaStep, StatelessModule, checkpointed_call, internal_checkpointing
from metaloss.fusion import LossGenerator, ReFusion, tdfusion_loss
from metaloss.meta_step import SecondOrder
from tests.toy import seg_loss


class _Parts(nn.Module):
    """Two parts, each run through ``checkpointed_call`` when ``checkpointed``."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second, self.checkpointed = first, second, False

    def forward(self, x: Tensor) -> Tensor:
        for part in (self.first, self.second):
            x = checkpointed_call(part, x) if self.checkpointed else part(x)
        return x


def _conv_parts() -> _Parts:
    return _Parts(
        nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Dropout(0.3), nn.GELU()),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh()),
    )


def _linear_parts() -> _Parts:
    return _Parts(nn.Sequential(nn.Linear(5, 5), nn.Tanh()), nn.Sequential(nn.Linear(5, 5), nn.Softplus()))


@pytest.mark.parametrize(
    ("build", "shape"), [(_conv_parts, (2, 2, 6, 6)), (_linear_parts, (3, 5))], ids=["conv", "linear"]
)
@pytest.mark.parametrize("create_graph", [False, True], ids=["first-order", "second-order"])
def test_checkpointed_call_recomputes_with_the_parameters_the_forward_used(
    build: Callable[[], _Parts], shape: tuple[int, ...], create_graph: bool
) -> None:
    """Under a functional call with parameters that are not the module's own (as a meta step's
    virtual step runs it), the gradients, and their own gradients, equal those of the plain call;
    dropout's draws are replayed."""
    torch.manual_seed(0)
    net, x = build(), torch.randn(*shape)
    other = {k: (1.5 * v.detach() + 0.1).requires_grad_() for k, v in net.named_parameters()}
    state = {**other, **{k: v.clone() for k, v in net.named_buffers()}}

    def gradients(checkpointed: bool) -> Tensor:
        net.checkpointed = checkpointed
        torch.manual_seed(1)
        out = functional_call(net, state, (x,)).square().sum()
        grads = torch.autograd.grad(out, list(other.values()), create_graph=create_graph)
        flat = torch.cat([g.flatten() for g in grads])
        if not create_graph:
            return flat
        second = torch.autograd.grad(flat.square().sum(), list(other.values()))
        return torch.cat([flat, *(g.flatten() for g in second)])

    plain = gradients(False)
    assert plain.norm() > 0
    torch.testing.assert_close(gradients(True), plain, rtol=1e-5, atol=1e-6)


def test_checkpointed_call_is_the_plain_call_without_a_graph() -> None:
    torch.manual_seed(0)
    net, x = _linear_parts(), torch.randn(3, 5)
    net.checkpointed = True
    with torch.no_grad():
        out = net(x)
    assert out.grad_fn is None
    torch.testing.assert_close(out, net.second(net.first(x)))


class _SegFormerLogits(nn.Module):
    """A small real SegFormer (transformers, randomly initialised) with logits at input size."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        config = SegformerConfig(num_channels=1)
        config.num_labels = 2
        self.net = SegformerForSemanticSegmentation(config)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.net(pixel_values=x).logits
        return nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear")


def test_a_segformer_with_gradient_checkpointing_on_is_refused_by_name() -> None:
    """transformers' own checkpointing would recompute with the module's own parameters in a
    virtual step; the view names the first such block and the way out, and runs once it is off
    (or in eval mode, where transformers does not checkpoint)."""
    torch.manual_seed(0)
    task = _SegFormerLogits()
    view, x = StatelessModule(task), torch.rand(1, 1, 32, 32)
    task.net.activation_checkpointing_enable()
    found = internal_checkpointing(task)
    assert found and all(name.startswith("net.segformer.") for name in found)
    with pytest.raises(
        ValueError,
        match=r"_SegFormerLogits has activation checkpointing on in 'net\.segformer\..*checkpointing_disable\(\)",
    ):
        view(view.snapshot(), x)
    meta = MetaStep(ReFusion(dim=8, num_blocks=1), tdfusion_loss(LossGenerator(dim=8, num_blocks=1)), task, seg_loss)
    batch = {"a": x, "b": x, "target": torch.zeros(1, 32, 32, dtype=torch.long)}
    with pytest.raises(ValueError, match="_SegFormerLogits has activation checkpointing on"):
        meta.step(batch, batch)  # the user's path: T's virtual step runs through the view
    with torch.no_grad():  # no graph, nothing recomputed: allowed
        view(view.snapshot(), x)
    task.eval()
    assert internal_checkpointing(task) == []
    view(view.snapshot(), x).sum().backward()
    task.train()
    task.net.activation_checkpointing_disable()
    assert internal_checkpointing(task) == []
    view(view.snapshot(), x).sum().backward()


def _set_blocks(model: ReFusion, generator: LossGenerator, on: bool) -> None:
    model.checkpoint_blocks = on
    generator.checkpoint_blocks = on


@pytest.mark.parametrize("second_order", ["jvp", "double_backward"])
def test_checkpointed_blocks_give_the_same_meta_gradient(second_order: SecondOrder) -> None:
    torch.manual_seed(0)
    model, generator = ReFusion(dim=8, num_blocks=1), LossGenerator(dim=8, num_blocks=1)
    loss = tdfusion_loss(generator)
    task = nn.Conv2d(1, 2, 3, padding=1)
    g = torch.Generator().manual_seed(1)
    batch = {
        "a": torch.rand(2, 1, 16, 16, generator=g),
        "b": torch.rand(2, 1, 16, 16, generator=g),
        "target": torch.randint(0, 2, (2, 16, 16), generator=g),
    }
    meta = MetaStep(
        model, loss, task, seg_loss, inner=InnerSGD(0.5), task_inner=InnerSGD(0.5), second_order=second_order
    )

    def meta_gradient(on: bool) -> Tensor:
        _set_blocks(model, generator, on)
        result, _ = meta.hypergradient(batch, batch)
        return torch.cat([grad.flatten() for grad in result.grads])

    plain = meta_gradient(False)
    assert plain.norm() > 0
    torch.testing.assert_close(meta_gradient(True), plain, rtol=1e-5, atol=1e-6 * float(plain.abs().max()))


def test_checkpointed_blocks_keep_a_fraction_of_the_activations() -> None:
    """With a graph recorded, the forward passes of F and G save under a fifth of the elements
    they save otherwise; without one, the output is the same."""
    torch.manual_seed(0)
    model, generator = ReFusion(), LossGenerator()
    x = torch.rand(1, 2, 32, 32)

    def saved_elements(on: bool) -> int:
        _set_blocks(model, generator, on)
        sizes: list[int] = []

        def pack(t: Tensor) -> Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
            generator(x[:, :1], x[:, 1:])
        return sum(sizes)

    assert saved_elements(True) < saved_elements(False) / 5
    with torch.no_grad():
        _set_blocks(model, generator, True)
        checkpointed = model(x)
        _set_blocks(model, generator, False)
        torch.testing.assert_close(checkpointed, model(x), rtol=0, atol=0)
