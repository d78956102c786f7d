"""MetaStep behaviour: the user's modules are untouched, bad input is named, non-finite
meta-gradients never reach the generator, custom task networks plug in."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from metaloss import (
    ConstantWeights,
    InnerSGD,
    LearnableLoss,
    MaxNormalizedSGD,
    MetaStep,
    NonFiniteHypergradientError,
)
from metaloss.map_gradient import MAP_GRADIENTS, shift_direction
from metaloss.meta_step import META_STEP_STAGES
from tests.toy import SmallFusion, SmallGenerator, SmallSegmenter, seg_loss, weighted_squared_error


def _batch(seed: int, size: int = 8) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.rand(2, 1, size, size, generator=g),
        "b": torch.rand(2, 1, size, size, generator=g),
        "target": torch.randint(0, 2, (2, size, size), generator=g),
    }


def _double(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def _parts(policy: str = "discard"):
    torch.manual_seed(0)
    fusion, task = SmallFusion(), SmallSegmenter()
    loss = LearnableLoss(SmallGenerator(), {"int": weighted_squared_error})
    opt_g = torch.optim.Adam(loss.parameters(), lr=1e-2)
    meta = MetaStep(
        fusion,
        loss,
        task,
        seg_loss,
        outer_optimizer=opt_g,
        inner=InnerSGD(lr=0.1),
        task_inner=InnerSGD(lr=0.1),
        buffer_policy=policy,
    )
    return fusion, loss, task, meta


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("policy", ["discard", "frozen"])
@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_meta_step_leaves_user_modules_bit_identical(policy: str, mode: str) -> None:
    fusion, loss, task, meta = _parts(policy)
    meta.mode = mode
    before_f, before_t, before_g = _state(fusion), _state(task), _state(loss)
    assert any("running_mean" in k for k in before_f) and any("running_var" in k for k in before_t)
    stats = meta.step(_batch(1), _batch(2))
    for name, module, before in (("F", fusion, before_f), ("T", task, before_t)):
        after = module.state_dict()
        for key, value in before.items():
            assert torch.equal(after[key], value), f"{name}.{key} changed during a meta step"
        assert all(p.grad is None for p in module.parameters()), f"{name} received .grad"
    assert fusion.training and task.training
    changed = [k for k, v in loss.state_dict().items() if not torch.equal(v, before_g[k])]
    assert changed, "the generator was not stepped"
    assert stats.hypergrad_norm > 0 and not stats.skipped


def test_generator_receives_no_first_order_shortcut() -> None:
    """First-order MAML would give G no gradient: the exact mode must give a non-zero one."""
    _, _, _, meta = _parts()
    result, _ = meta.hypergradient(_batch(1), _batch(2))
    assert result.norm() > 0


def test_k_way_weight_maps() -> None:
    torch.manual_seed(0)
    k = 3
    fusion, task = SmallFusion(k=k), SmallSegmenter()
    loss = LearnableLoss(SmallGenerator(k=k), {"int": weighted_squared_error})
    from metaloss import SourcesAdapter

    meta = MetaStep(
        fusion,
        loss,
        task,
        seg_loss,
        adapter=SourcesAdapter(keys=("a", "b", "c")),
        inner=InnerSGD(lr=0.1),
        task_inner=InnerSGD(lr=0.1),
    )
    batch = _batch(1) | {"c": torch.rand(2, 1, 8, 8)}
    _, stats = meta.hypergradient(batch, batch)
    assert len(stats.weight_mean) == k and math.isclose(sum(stats.weight_mean), 1.0, rel_tol=1e-5)


def test_nonfinite_hypergradient_is_skipped_or_raised() -> None:
    fusion, loss, task, meta = _parts()

    def exploding(output: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return seg_loss(output, batch) * torch.tensor(float("inf"))

    meta.task_loss = exploding
    before = _state(loss)
    stats = meta.step(_batch(1), _batch(2))
    assert stats.skipped and stats.skipped_total == 1 and meta.skipped_total == 1
    assert all(torch.equal(v, before[k]) for k, v in loss.state_dict().items())
    assert all(p.grad is None for p in loss.parameters())
    meta.nonfinite = "raise"
    with pytest.raises(NonFiniteHypergradientError, match="not finite"):
        meta.step(_batch(1), _batch(2))


def test_sources_of_different_shapes_are_rejected() -> None:
    _, _, _, meta = _parts()
    bad = _batch(1) | {"b": torch.rand(2, 1, 8, 6)}
    with pytest.raises(ValueError, match="share one shape"):
        meta.step(bad, _batch(2))


def test_non_scalar_task_loss_is_rejected() -> None:
    _, _, _, meta = _parts()
    meta.task_loss = lambda output, batch: nn.functional.cross_entropy(output, batch["target"], reduction="none")
    with pytest.raises(ValueError, match="task_loss must return a scalar"):
        meta.step(_batch(1), _batch(2))


@pytest.mark.parametrize(
    ("generator", "match"),
    [
        (nn.Conv2d(2, 2, 1), "do not sum to 1|negative"),  # raw logits given as weights
        (nn.Sequential(nn.Conv2d(2, 3, 1), nn.Softmax(1)), "expected shape"),  # 3 maps for 2 sources
    ],
)
def test_invalid_weight_map_is_rejected(generator: nn.Module, match: str) -> None:
    class Concat(nn.Module):
        def __init__(self, body: nn.Module) -> None:
            super().__init__()
            self.body = body

        def forward(self, *sources: Tensor) -> Tensor:
            return self.body(torch.cat(sources, 1))

    loss = LearnableLoss(Concat(generator), {"int": weighted_squared_error}, weights="given")
    with pytest.raises(ValueError, match=match):
        loss([torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)], torch.rand(2, 1, 8, 8))


def test_constant_weights_have_nothing_to_meta_learn() -> None:
    loss = LearnableLoss(ConstantWeights(2), {"int": weighted_squared_error}, weights="given")
    out = loss([torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4)], torch.rand(1, 1, 4, 4))
    assert torch.allclose(out.weights, torch.full_like(out.weights, 0.5))
    meta = MetaStep(
        SmallFusion(), loss, SmallSegmenter(), seg_loss, inner=InnerSGD(lr=0.1), task_inner=InnerSGD(lr=0.1)
    )
    with pytest.raises(ValueError, match="no trainable parameters"):
        meta.hypergradient(_batch(1), _batch(2))


def test_custom_task_network_and_loss_plug_in_without_subclassing() -> None:
    """A two-input task model, tuple batches and a hand-written adapter class."""

    class TwoInputRegressor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 1, 3, padding=1)

        def forward(self, fused: Tensor, guide: Tensor) -> Tensor:
            return self.conv(torch.cat([fused, guide], 1)).mean(dim=(1, 2, 3))

    class TupleAdapter:  # any object with the four methods; no base class
        def sources(self, batch):
            return [batch[0], batch[1]]

        def model_args(self, batch):
            return (torch.cat([batch[0], batch[1]], 1),)

        def task_model_args(self, batch):
            return self.model_args(batch)

        def task_args(self, batch, prediction):
            return (prediction, batch[1])

    def regression_loss(output: Tensor, batch) -> Tensor:
        return ((output - batch[2]) ** 2).mean()

    torch.manual_seed(0)
    loss = LearnableLoss(SmallGenerator(), {"int": weighted_squared_error})
    meta = MetaStep(
        SmallFusion(),
        loss,
        TwoInputRegressor(),
        regression_loss,
        adapter=TupleAdapter(),
        outer_optimizer=MaxNormalizedSGD(loss.parameters(), lr=1e-3),
        inner=InnerSGD(lr=0.1),
        task_inner=InnerSGD(lr=0.1),
    )
    batch = (torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), torch.rand(2))
    before = _state(loss)
    stats = meta.step(batch, batch)
    assert math.isfinite(stats.outer_loss) and stats.hypergrad_norm > 0
    deltas = [(v - before[k]).abs().max() for k, v in loss.state_dict().items()]
    assert max(deltas).item() == pytest.approx(1e-3, rel=1e-4)  # max-normalised: largest change = lr


def test_max_normalized_sgd_takes_the_global_maximum() -> None:
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(2))
    opt = MaxNormalizedSGD([a, b], lr=0.5)
    a.grad = torch.tensor([1.0, -2.0, 0.5])
    b.grad = torch.tensor([4.0, 0.0])
    opt.step()
    torch.testing.assert_close(a.detach(), torch.tensor([-0.125, 0.25, -0.0625]))
    torch.testing.assert_close(b.detach(), torch.tensor([-0.5, 0.0]))
    a.grad, b.grad = torch.zeros(3), torch.zeros(2)
    opt.step()  # a zero maximum takes no step
    torch.testing.assert_close(b.detach(), torch.tensor([-0.5, 0.0]))


def test_bf16_autocast_keeps_losses_in_float32_and_the_meta_gradient_close() -> None:
    fusion, loss, task, meta = _parts()
    reference, _ = meta.hypergradient(_batch(1, size=16), _batch(2, size=16))
    meta.autocast_dtype = torch.bfloat16
    result, stats = meta.hypergradient(_batch(1, size=16), _batch(2, size=16))
    assert result.inner_loss.dtype == torch.float32 and result.outer_loss.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in result.grads)
    ref = torch.cat([g.flatten() for g in reference.grads])
    got = torch.cat([g.flatten() for g in result.grads])
    cosine = torch.nn.functional.cosine_similarity(ref, got, dim=0).item()
    assert cosine > 0.9, cosine  # bf16 forwards: same direction, ~1e-2 relative noise
    meta.second_order = "compiled_jvp"  # the compiled product runs under autocast too
    compiled, _ = meta.hypergradient(_batch(1, size=16), _batch(2, size=16))
    assert all(g.dtype == torch.float32 for g in compiled.grads)
    again = torch.cat([g.flatten() for g in compiled.grads])
    assert torch.nn.functional.cosine_similarity(got, again, dim=0).item() > 0.99


def test_a_generator_compiled_in_place_gives_the_same_meta_gradient() -> None:
    """A user may compile the loss generator (``loss.generator.compile()``): the meta step runs
    it as any module (its backward is differentiated once), with the same meta-gradient, and its
    parameters keep their names for checkpoints."""
    fusion, loss, task, meta = _parts()
    fusion.double(), loss.double(), task.double()
    train, test = _double(_batch(1)), _double(_batch(2))
    names = list(loss.state_dict())
    eager = meta.hypergradient(train, test)[0].grads
    loss.generator.compile()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = meta.hypergradient(train, test)[0].grads
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it really ran compiled
    assert list(loss.state_dict()) == names
    assert torch.cat([g.flatten() for g in eager]).norm() > 0
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("policy", ["discard", "frozen"])
@pytest.mark.parametrize(
    ("mode", "second_order"), [("exact", "jvp"), ("exact", "double_backward"), ("finite_difference", "jvp")]
)
def test_activation_checkpointing_gives_the_same_meta_gradient(policy: str, mode: str, second_order: str) -> None:
    """Recomputing F's and G's activations (BatchNorm in train mode included) in the backward
    passes must not change the meta-gradient, and must leave F's buffers alone."""
    fusion, loss, task, meta = _parts(policy)
    fusion.double(), loss.double(), task.double()
    meta.mode, meta.second_order = mode, second_order
    train, test = _double(_batch(1)), _double(_batch(2))
    calls: dict[str, int] = {"F": 0, "G": 0}

    def counted(name: str, forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def run(*args: Tensor) -> Tensor:  # forward hooks do not see checkpoint's recomputation
            calls[name] += 1
            return forward(*args)

        return run

    fusion.forward = counted("F", fusion.forward)  # type: ignore[method-assign]
    loss.generator.forward = counted("G", loss.generator.forward)  # type: ignore[method-assign]
    plain = meta.hypergradient(train, test)[0].grads
    plain_calls, before = dict(calls), _state(fusion)
    meta.activation_checkpointing = True
    recomputed = meta.hypergradient(train, test)[0].grads
    assert calls["F"] - plain_calls["F"] > plain_calls["F"]  # F's forwards really were recomputed
    assert calls["G"] - plain_calls["G"] > plain_calls["G"]  # and G's
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(v, fusion.state_dict()[k]) for k, v in before.items())


def test_accumulated_pairs_step_with_the_mean_meta_gradient() -> None:
    """accumulate() twice, then apply(): the generator moves by the mean of the two meta-gradients."""
    fusion, loss, task, meta = _parts()
    meta.outer_optimizer = torch.optim.SGD(loss.parameters(), lr=1.0)
    pairs = [(_batch(1), _batch(2)), (_batch(3), _batch(4))]
    expected = [meta.hypergradient(*pair)[0].grads for pair in pairs]
    before = [p.detach().clone() for p in meta.generator_parameters]
    for pair in pairs:
        meta.accumulate(*pair)
    assert meta.apply()
    for p, b, g1, g2 in zip(meta.generator_parameters, before, *expected):
        torch.testing.assert_close(p.detach(), b - (g1 + g2) / 2, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="accumulate"):
        meta.apply()  # nothing pending any more


@pytest.mark.parametrize("weighted", [False, True], ids=["", "weighted"])
@pytest.mark.parametrize("map_gradient", MAP_GRADIENTS)
@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_weight_map_gradient_is_the_generator_gradient_before_the_chain_rule(
    mode: str, map_gradient: str, weighted: bool
) -> None:
    """dL/dphi = (dw/dphi)^T dL/dw: the weight-map gradient carried back through G gives the
    meta-gradient; "centred" carries back that gradient minus its spatial mean per image and source,
    "shift_removed" minus its projection per image on the loss's shift direction, which for a
    weighted squared error is 2 (F - I_k) / n; map_gradient_weights multiply what is carried."""
    torch.manual_seed(0)
    fusion, task = SmallFusion(), SmallSegmenter()
    loss = LearnableLoss(SmallGenerator(), {"int": weighted_squared_error}).double()
    meta = MetaStep(
        fusion.double(),
        loss,
        task.double(),
        seg_loss,
        inner=InnerSGD(0.1),
        task_inner=InnerSGD(0.1),
        mode=mode,  # type: ignore[arg-type]
        weight_map_grad=True,
        map_gradient=map_gradient,  # type: ignore[arg-type]
        map_gradient_weights=(lambda batch: 1.0 + 3.0 * batch["target"][:, None]) if weighted else None,
    )
    train, test = _double(_batch(1)), _double(_batch(2))
    result, stats = meta.hypergradient(train, test)
    assert stats.weight_map_grad is not None and stats.weights is not None
    assert stats.weight_map_grad.shape == stats.weights.shape == (2, 2, 8, 8)
    weights = loss.weights([train["a"], train["b"]])
    carried = stats.weight_map_grad
    if map_gradient == "centred":
        carried = carried - carried.mean(dim=(2, 3), keepdim=True)
        assert not torch.allclose(carried, stats.weight_map_grad)  # the global part was not zero
    if map_gradient == "shift_removed":
        with torch.no_grad():
            prediction = fusion(torch.cat([train["a"], train["b"]], 1))
        u = 2 * (prediction - torch.cat([train["a"], train["b"]], 1)) / prediction[:, :1].numel()
        torch.testing.assert_close(shift_direction(loss, prediction, [train["a"], train["b"]], weights), u)
        along = (carried * u).sum((1, 2, 3), keepdim=True) / (u * u).sum((1, 2, 3), keepdim=True)
        carried = carried - along * u
        assert float(along.abs().min()) > 0 and float((carried * u).sum((1, 2, 3)).abs().max()) < 1e-12
    if weighted:
        carried = carried * (1.0 + 3.0 * train["target"][:, None])
    chained = torch.autograd.grad(weights, meta.generator_parameters, grad_outputs=carried)
    for a, b in zip(chained, result.grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
    assert float(stats.weight_map_grad.abs().sum()) > 0


@pytest.mark.parametrize("virtual_step", ["model", "output"])
@pytest.mark.parametrize("carried", ["centred", "shift_removed", "weighted"])
def test_a_changed_map_gradient_is_carried_without_running_the_generator_again(carried: str, virtual_step: str) -> None:
    """A map gradient changed before it reaches G (centred, shift-removed, weighted) goes back
    through the graph of G's one forward in the meta step: running G a second time cost the
    demo's meta step about half again its time."""
    torch.manual_seed(0)
    fusion, loss, task, _ = _parts()
    meta = MetaStep(
        fusion,
        loss,
        task,
        seg_loss,
        inner=InnerSGD(0.1),
        task_inner=InnerSGD(0.1),
        virtual_step=virtual_step,  # type: ignore[arg-type]
        map_gradient="full" if carried == "weighted" else carried,  # type: ignore[arg-type]
        map_gradient_weights=(lambda batch: 1.0 + 3.0 * batch["target"][:, None]) if carried == "weighted" else None,
    )
    calls = []
    hook = loss.generator.register_forward_hook(lambda *_: calls.append(1))
    try:
        result, _ = meta.hypergradient(_batch(1), _batch(2))
    finally:
        hook.remove()
    assert len(calls) == 1
    assert all(g.shape == p.shape for g, p in zip(result.grads, meta.generator_parameters, strict=True))
    assert float(sum(g.abs().sum() for g in result.grads)) > 0


def test_output_virtual_step_meta_gradient_matches_central_differences() -> None:
    """virtual_step="output": the meta-gradient is d/dphi of L_t(T'(F - lr n dL_f/dF)) on the
    meta-train batch, with T' one SGD step of T on F's output (float64 central differences of
    that function, written out here without MetaStep)."""
    torch.manual_seed(0)
    fusion, task = SmallFusion().double(), SmallSegmenter().double()
    loss = LearnableLoss(SmallGenerator(), {"int": weighted_squared_error}).double()
    meta = MetaStep(fusion, loss, task, seg_loss, task_inner=InnerSGD(0.1), virtual_step="output", output_lr=0.3)
    train, test = _double(_batch(1)), _double(_batch(2))
    result, _ = meta.hypergradient(train, test)
    sources = [train["a"], train["b"]]
    with torch.no_grad():
        fused = fusion(torch.cat(sources, 1))
    names = [n for n, _ in task.named_parameters()]
    grads = torch.autograd.grad(seg_loss(task(fused), train), list(task.parameters()))
    stepped = {n: (p - 0.1 * g).detach() for n, p, g in zip(names, task.parameters(), grads, strict=True)}

    def outer(phi_shift: list[Tensor]) -> float:
        with torch.no_grad():
            for p, d in zip(meta.generator_parameters, phi_shift, strict=True):
                p.add_(d)
        try:
            f = fused.clone().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(loss(sources, f).total, f)
            moved = fused - 0.3 * fused.numel() * g
            value = float(seg_loss(torch.func.functional_call(task, stepped, (moved,)), train))
        finally:
            with torch.no_grad():
                for p, d in zip(meta.generator_parameters, phi_shift, strict=True):
                    p.sub_(d)
        return value

    direction = [torch.randn_like(p) for p in meta.generator_parameters]
    eps = 1e-5
    numeric = (outer([eps * d for d in direction]) - outer([-eps * d for d in direction])) / (2 * eps)
    analytic = float(sum((g * d).sum() for g, d in zip(result.grads, direction, strict=True)))
    assert abs(analytic) > 1e-6
    assert math.isclose(analytic, numeric, rel_tol=1e-5)


@pytest.mark.parametrize("virtual_step", ["model", "output"])
def test_output_virtual_step_keeps_the_meta_gradient_where_the_task_asks(virtual_step: str) -> None:
    """A fixed metric that asks for one brighter pixel: with virtual_step="output" the weight map
    is asked to change at that pixel only; a virtual step of the model's shared parameters
    spreads the request over every pixel."""
    torch.manual_seed(0)
    fusion = SmallFusion()
    loss = LearnableLoss(SmallGenerator(), {"int": weighted_squared_error})
    meta = MetaStep(
        fusion,
        loss,
        nn.Identity(),
        lambda fused, batch: -fused[0, 0, 3, 4],
        inner=InnerSGD(0.1),
        virtual_step=virtual_step,  # type: ignore[arg-type]
        weight_map_grad=True,
    )
    batch = _batch(1)
    _, stats = meta.hypergradient(batch, batch)
    assert stats.weight_map_grad is not None
    moved = stats.weight_map_grad.abs().sum(1) > 0  # (B, H, W)
    if virtual_step == "output":
        expected = torch.zeros_like(moved)
        expected[0, 3, 4] = True
        assert torch.equal(moved, expected)
        # and it asks for the brighter source there
        a, b = float(batch["a"][0, 0, 3, 4]), float(batch["b"][0, 0, 3, 4])
        descent = -stats.weight_map_grad[0, :, 3, 4]
        assert (float(descent[0] - descent[1]) > 0) == (a > b)
    else:
        assert int(moved.sum()) > moved.numel() // 2


def test_output_virtual_step_rejects_what_it_cannot_do() -> None:
    """It takes T's step as the paper does, and its loss on the task view: a task view of another
    shape than the sources is named."""
    fusion, loss, task, _ = _parts()
    with pytest.raises(ValueError, match="current_model"):
        MetaStep(fusion, loss, task, seg_loss, virtual_step="output", task_adaptation="virtual_model")
    with pytest.raises(ValueError, match="virtual_step"):
        MetaStep(fusion, loss, task, seg_loss, virtual_step="pixels")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output_lr"):
        MetaStep(fusion, loss, task, seg_loss, virtual_step="output", output_lr=0.0)

    class Resized:  # a task view of twice the size, without task_sources
        def sources(self, batch: dict[str, Tensor]) -> list[Tensor]:
            return [batch["a"], batch["b"]]

        def model_args(self, batch: dict[str, Tensor]) -> tuple[Tensor]:
            return (torch.cat(self.sources(batch), 1),)

        def task_model_args(self, batch: dict[str, Tensor]) -> tuple[Tensor]:
            return (nn.functional.interpolate(self.model_args(batch)[0], scale_factor=2.0),)

        def task_args(self, batch: dict[str, Tensor], prediction: Tensor) -> tuple[Tensor]:
            return (prediction,)

    meta = MetaStep(
        fusion,
        loss,
        task,
        lambda out, batch: out.mean(),
        adapter=Resized(),
        task_inner=InnerSGD(0.1),
        virtual_step="output",
    )
    with pytest.raises(ValueError, match="task_sources"):
        meta.hypergradient(_batch(1), _batch(2))


_FIRST_ORDER = {"metaloss.inner_loss", "metaloss.inner_gradient", "metaloss.outer_loss", "metaloss.outer_gradient"}


@pytest.mark.parametrize(
    ("options", "stages"),
    [
        ({}, _FIRST_ORDER | {"metaloss.second_order", "metaloss.forward_product"}),
        ({"second_order": "double_backward"}, _FIRST_ORDER - {"metaloss.outer_gradient"} | {"metaloss.second_order"}),
        ({"mode": "finite_difference"}, _FIRST_ORDER | {"metaloss.second_order"}),
        ({"mode": "implicit"}, _FIRST_ORDER | {"metaloss.second_order"}),
        ({"virtual_step": "output"}, _FIRST_ORDER - {"metaloss.outer_gradient"} | {"metaloss.second_order"}),
    ],
    ids=["jvp", "double_backward", "finite_difference", "implicit", "output"],
)
def test_a_profiled_meta_step_names_its_stages(options: dict[str, Any], stages: set[str]) -> None:
    """``torch.profiler`` shows each stage of the meta step as a named range (``META_STEP_STAGES``)."""
    torch.manual_seed(0)
    fusion, task = SmallFusion(), SmallSegmenter()
    loss = LearnableLoss(SmallGenerator(), {"int": weighted_squared_error})
    meta = MetaStep(
        fusion,
        loss,
        task,
        seg_loss,
        outer_optimizer=torch.optim.Adam(loss.parameters(), lr=1e-2),
        inner=InnerSGD(lr=0.1),
        task_inner=InnerSGD(lr=0.1),
        **options,
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        meta.step(_batch(1), _batch(2))
    names = {event.key for event in profile.key_averages() if event.key.startswith("metaloss.")}
    assert names == stages | {"metaloss.task_virtual_step", "metaloss.loss_weights"}
    assert names <= set(META_STEP_STAGES)
