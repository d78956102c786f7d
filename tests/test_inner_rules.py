"""A virtual step is the step the user's real optimiser takes: every option, every param group,
frozen parameters, and several steps unrolled (checked against real ``optimizer.step()`` calls
and, for the meta-gradient through k steps, against float64 central differences of a reference
that trains copies of the networks with real optimisers)."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch
from torch import nn

from metaloss import InnerAdam, InnerSGD, LearnableLoss, MetaStep, MetaTrainerConfig
from tests.toy import (
    SmallFusion,
    SmallGenerator,
    SmallSegmenter,
    central_difference,
    seg_loss,
    toy_batch,
    weighted_squared_error,
)


def _model() -> SmallFusion:
    torch.manual_seed(0)
    model = SmallFusion(batchnorm=False).double()
    model.body[0].bias.requires_grad_(False)  # a frozen parameter: it must not move
    return model


def _groups(model: SmallFusion, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Two param groups with different learning rates and weight decays (the frozen bias in the first)."""
    first, second = list(model.body[0].parameters()), list(model.body[3].parameters())
    return [
        {"params": first, "lr": 0.3, **options},
        {"params": second, "lr": 0.01, **{**options, "weight_decay": 0.05 if options.get("weight_decay") else 0}},
    ]


def _loss(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 2, 6, 6, generator=g, dtype=torch.float64)
    return (model(x) - 0.3).pow(2).mean() + 0.1 * model(x).mean()


def _check_virtual_equals_real(model: nn.Module, opt: torch.optim.Optimizer, rule: Any, steps: int) -> None:
    for seed in range(2):  # two real steps first: the virtual ones start from non-trivial state
        opt.zero_grad()
        _loss(model, seed).backward()
        opt.step()
    real = list(model.parameters())
    theta = tuple(p.detach().clone() for p in real)
    update = rule.start(theta, real, opt)
    for i in range(steps):
        virtual_model = copy.deepcopy(model)
        with torch.no_grad():
            for p, t in zip(virtual_model.parameters(), theta):
                p.copy_(t)
        for p in virtual_model.parameters():
            p.requires_grad_(True)  # as the meta step's snapshot: every parameter gets a gradient
        grads = torch.autograd.grad(_loss(virtual_model, 10 + i), list(virtual_model.parameters()))
        theta = update(theta, grads)
    before = [p.detach().clone() for p in real]
    for i in range(steps):
        opt.zero_grad()
        _loss(model, 10 + i).backward()
        opt.step()
    for v, p, b in zip(theta, real, before):
        torch.testing.assert_close(v, p.detach(), rtol=1e-6, atol=1e-9)
        if not p.requires_grad:
            assert torch.equal(v, b), "a frozen parameter moved in the virtual step"


SGD_GRID = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product((0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 0.01), (False, True))
    if not (n and (m == 0 or d != 0))  # torch refuses Nesterov without momentum or with dampening
]


@pytest.mark.parametrize("options", SGD_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("steps", [1, 3])
def test_virtual_sgd_equals_real_sgd(options: dict[str, Any], steps: int) -> None:
    model = _model()
    opt = torch.optim.SGD(_groups(model, options))
    _check_virtual_equals_real(model, opt, InnerSGD(), steps)


ADAM_GRID = [
    dict(weight_decay=wd, amsgrad=ams, maximize=mx, betas=betas)
    for wd, ams, mx, betas in itertools.product((0.0, 0.01), (False, True), (False, True), ((0.9, 0.999), (0.5, 0.9)))
]


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("options", ADAM_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("steps", [1, 3])
def test_virtual_adam_equals_real_adam(cls: type, options: dict[str, Any], steps: int) -> None:
    model = _model()
    opt = cls(_groups(model, options))
    _check_virtual_equals_real(model, opt, InnerAdam(eps_root=1e-30), steps)


def test_inner_sgd_beside_another_optimiser_takes_plain_steps_at_each_groups_lr() -> None:
    """The released TDFusion code: a virtual SGD step beside a real Adam, at F's learning rate."""
    model = _model()
    opt = torch.optim.Adam(_groups(model, {"weight_decay": 0.1}))
    real = list(model.parameters())
    theta = tuple(p.detach().clone() for p in real)
    grads = tuple(torch.ones_like(t) for t in theta)
    new = InnerSGD().start(theta, real, opt)(theta, grads)
    lrs = [0.3] * 2 + [0.01] * 2
    for t, n, p, lr in zip(theta, new, real, lrs):
        torch.testing.assert_close(n, t - (lr if p.requires_grad else 0.0) * 1.0)


def test_parameters_the_optimiser_does_not_hold_stay_fixed() -> None:
    model = _model()
    opt = torch.optim.SGD(model.body[3].parameters(), lr=0.1)  # the first layer is not trained
    real = list(model.parameters())
    theta = tuple(p.detach().clone() for p in real)
    new = InnerSGD().start(theta, real, opt)(theta, tuple(torch.ones_like(t) for t in theta))
    assert torch.equal(new[0], theta[0]) and not torch.equal(new[2], theta[2])


def test_a_scheduled_optimiser_is_followed_at_its_current_learning_rate_and_momentum() -> None:
    """OneCycleLR writes its bookkeeping (max_lr, base_momentum, ...) into the param groups."""
    model = _model()
    opt = torch.optim.SGD(_groups(model, {"momentum": 0.9}))
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.3, 0.01], total_steps=10)
    _check_virtual_equals_real(model, opt, InnerSGD(), steps=2)


def test_an_option_the_virtual_step_cannot_reproduce_is_refused_by_name() -> None:
    model = _model()

    class ScaledSGD(torch.optim.SGD):
        def __init__(self, params: Any, **kw: Any) -> None:
            super().__init__(params, **kw)
            for g in self.param_groups:
                g.setdefault("scale", 2.0)
                g.setdefault("name", "all")  # a label (text) is not an option

    opt = ScaledSGD(model.parameters(), lr=0.1)
    theta = tuple(p.detach().clone() for p in model.parameters())
    with pytest.raises(ValueError, match=r"\['scale'\].*param group 0"):
        InnerSGD().start(theta, list(model.parameters()), opt)


# ---------------------------------------------------------------- several inner steps: meta-gradient

LR_T = 0.05


def _setup(rule: str) -> tuple[Any, ...]:
    torch.manual_seed(0)
    fusion = SmallFusion().double()
    generator = SmallGenerator().double()
    task = SmallSegmenter().double()
    loss = LearnableLoss(generator, {"int": weighted_squared_error})
    if rule == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(fusion.parameters(), lr=0.05, momentum=0.9)
        inner: Any = InnerSGD()
    else:
        opt = torch.optim.Adam(fusion.parameters(), lr=0.02)
        inner = InnerAdam()
    for s in range(2):  # real history: momentum buffers and Adam moments that the virtual steps start from
        opt.zero_grad()
        torch.stack([((p + 0.1 * s) ** 2).sum() for p in fusion.parameters()]).sum().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)

    return fusion, loss, task, opt, inner, toy_batch(1), toy_batch(2)


def _reference_outer_loss(fusion, loss, task, opt, train, test, steps: int) -> torch.Tensor:
    """Train copies with *real* optimisers: T one SGD step on F(train), F k steps under the loss."""
    f, t = copy.deepcopy(fusion), copy.deepcopy(task)
    x_train = torch.cat([train["a"], train["b"]], 1)
    with torch.no_grad():
        fused = f(x_train)
    t_opt = torch.optim.SGD(t.parameters(), lr=LR_T)
    seg_loss(t(fused), train).backward()
    t_opt.step()
    f_opt = type(opt)(f.parameters())
    f_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares the state tensors
    with torch.no_grad():
        weights = loss.weights([train["a"], train["b"]])
    for _ in range(steps):
        f_opt.zero_grad()
        loss.combine(f(x_train), [train["a"], train["b"]], weights).total.backward()
        f_opt.step()
    with torch.no_grad():
        return seg_loss(t(f(torch.cat([test["a"], test["b"]], 1))), test)


@pytest.mark.parametrize("rule", ["sgd", "adam"])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_unrolled_meta_gradient_matches_real_optimiser_finite_differences(rule: str, steps: int) -> None:
    fusion, loss, task, opt, inner, train, test = _setup(rule)
    meta = MetaStep(
        fusion,
        loss,
        task,
        seg_loss,
        model_optimizer=opt,
        inner=inner,
        task_inner=InnerSGD(lr=LR_T),
        inner_steps=steps,
    )
    result, _ = meta.hypergradient(train, test)
    params = list(loss.parameters())
    g = torch.Generator().manual_seed(7)
    for _ in range(2):
        direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        norm = torch.stack([(d**2).sum() for d in direction]).sum().sqrt()
        direction = [d / norm for d in direction]
        analytic = torch.stack([(r * d).sum() for r, d in zip(result.grads, direction)]).sum().item()
        numeric = central_difference(
            lambda: _reference_outer_loss(fusion, loss, task, opt, train, test, steps), params, direction, 1e-3
        )
        assert abs(analytic) > 1e-9, "degenerate test: the directional meta-gradient is zero"
        assert abs(analytic - numeric) <= 1e-6 * abs(numeric) + 1e-12, (analytic, numeric)


def test_several_inner_steps_need_the_exact_mode() -> None:
    fusion, loss, task, opt, inner, *_ = _setup("sgd")
    with pytest.raises(ValueError, match="inner_steps"):
        MetaStep(fusion, loss, task, seg_loss, inner=inner, mode="finite_difference", inner_steps=2)
    with pytest.raises(ValueError, match="inner_steps"):
        MetaTrainerConfig(inner_steps=2, mode="finite_difference")
    with pytest.raises(ValueError, match="meta_test"):
        MetaTrainerConfig(meta_test="same")  # type: ignore[arg-type]


# ---------------------------------------------------------------- implicit differentiation


def test_implicit_mode_agrees_with_a_long_unrolled_horizon_at_convergence() -> None:
    """A linear F under a weighted squared error is a strongly convex inner problem (its Hessian's
    eigenvalues lie in 0.05..8.5 here): 1000 SGD steps at 0.2 converge, and there the implicit
    gradient and the unrolled one describe the same thing."""
    torch.manual_seed(0)
    fusion = nn.Conv2d(2, 1, 3, padding=1).double()
    generator = SmallGenerator().double()
    task = SmallSegmenter(batchnorm=False).double()
    loss = LearnableLoss(generator, {"int": weighted_squared_error})
    train = toy_batch(3)
    test = {k: v.flip(-1) for k, v in train.items()}
    grads = {}
    for mode, steps in (("exact", 1000), ("implicit", 1000), ("exact", 1)):
        meta = MetaStep(
            fusion,
            loss,
            task,
            seg_loss,
            inner=InnerSGD(lr=0.2),
            task_inner=InnerSGD(lr=LR_T),
            mode=mode,  # type: ignore[arg-type]
            inner_steps=steps,
            cg_iterations=100,
        )
        grads[(mode, steps)] = torch.cat([t.flatten() for t in meta.hypergradient(train, test)[0].grads])
    unrolled, implicit, one_step = grads[("exact", 1000)], grads[("implicit", 1000)], grads[("exact", 1)]
    assert unrolled.norm() > 0
    relative = ((implicit - unrolled).norm() / unrolled.norm()).item()
    assert relative <= 1e-3, relative
    assert (one_step - unrolled).norm() > 0.1 * unrolled.norm(), "degenerate test: one step already converged"
