"""The meta-gradient is checked, not assumed: against float64 central finite differences of an
independently written outer loss, for each inner rule, buffer policy and hypergradient mode."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from metaloss import InnerAdam, InnerSGD, LearnableLoss, MetaStep, hypergradient, hypergradient_jvp
from metaloss.meta_step import SECOND_ORDERS, SecondOrder
from tests.toy import (
    SmallFusion,
    SmallGenerator,
    SmallSegmenter,
    central_difference,
    seg_loss,
    toy_batch,
    weighted_squared_error,
)

LR_F, LR_T = 0.05, 0.05


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    fusion = SmallFusion().double()
    generator = SmallGenerator().double()
    task = SmallSegmenter().double()
    loss = LearnableLoss(generator, {"int": weighted_squared_error})

    return fusion, loss, task, toy_batch(1), toy_batch(2)


def _adam_optimizer(module: torch.nn.Module) -> torch.optim.Adam:
    """A real Adam with two steps of history, so the seeded inner Adam has non-zero moments.

    (With a zero second moment the Adam step is ~ lr * sign(g): a near-step function of g on
    which central differences say nothing.)
    """
    opt = torch.optim.Adam(module.parameters(), lr=LR_F)
    for _ in range(2):
        opt.zero_grad()
        torch.stack([((p + 0.1) ** 2).sum() for p in module.parameters()]).sum().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def _reference_outer_loss(fusion, loss, task, train, test, rule: str, adam_opt, policy: str) -> torch.Tensor:
    """L_t(T'(F'(test))) written with plain autograd, as a function of the generator's parameters."""
    frozen = policy == "frozen"

    def call(module, params, x):
        buffers = {n: b.clone() for n, b in module.named_buffers()}
        if frozen:
            module.eval()
        try:
            return functional_call(module, {**params, **buffers}, (x,))
        finally:
            module.train()

    # T' from one SGD step on the detached fusion of the train batch.
    with torch.no_grad():
        plain = {n: p.detach() for n, p in fusion.named_parameters()}
        fused_train = call(fusion, plain, torch.cat([train["a"], train["b"]], 1))
    t_params = {n: p.detach().requires_grad_() for n, p in task.named_parameters()}
    lt = seg_loss(call(task, t_params, fused_train), train)
    gt = torch.autograd.grad(lt, list(t_params.values()))
    t_new = {n: p - LR_T * g for (n, p), g in zip(t_params.items(), gt)}
    # F' from one differentiable step under the learnable loss.
    f_params = {n: p.detach().requires_grad_() for n, p in fusion.named_parameters()}
    pred = call(fusion, f_params, torch.cat([train["a"], train["b"]], 1))
    lf = loss([train["a"], train["b"]], pred).total
    gf = torch.autograd.grad(lf, list(f_params.values()), create_graph=True)
    f_new = {}
    for (n, p), g, real in zip(f_params.items(), gf, fusion.parameters()):
        if rule == "sgd":
            f_new[n] = p - LR_F * g
        else:
            st = adam_opt.state[real]
            b1, b2 = adam_opt.param_groups[0]["betas"]
            t = int(st["step"]) + 1
            m = b1 * st["exp_avg"] + (1 - b1) * g
            v = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
            f_new[n] = p - LR_F * m_hat / (torch.sqrt(v_hat + 1e-16) + adam_opt.param_groups[0]["eps"])
    fused_test = call(fusion, f_new, torch.cat([test["a"], test["b"]], 1))
    return seg_loss(call(task, {n: p.detach() for n, p in t_new.items()}, fused_test), test)


@pytest.mark.parametrize("rule", ["sgd", "adam"])
@pytest.mark.parametrize("policy", ["discard", "frozen"])
@pytest.mark.parametrize("second_order", SECOND_ORDERS)
def test_exact_hypergradient_matches_float64_central_differences(
    rule: str, policy: str, second_order: SecondOrder
) -> None:
    fusion, loss, task, train, test = _setup()
    adam_opt = _adam_optimizer(fusion) if rule == "adam" else None
    meta = MetaStep(
        fusion,
        loss,
        task,
        seg_loss,
        model_optimizer=adam_opt,
        inner=InnerSGD(lr=LR_F) if rule == "sgd" else InnerAdam(lr=LR_F, eps_root=1e-16),
        task_inner=InnerSGD(lr=LR_T),
        buffer_policy=policy,
        second_order=second_order,
    )
    result, _ = meta.hypergradient(train, test)
    gen_params = list(loss.parameters())

    def outer() -> torch.Tensor:
        return _reference_outer_loss(fusion, loss, task, train, test, rule, adam_opt, policy)

    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in gen_params]
        norm = torch.stack([(d**2).sum() for d in direction]).sum().sqrt()
        direction = [d / norm for d in direction]
        analytic = torch.stack([(r * d).sum() for r, d in zip(result.grads, direction)]).sum().item()
        numeric = central_difference(outer, gen_params, direction, eps=1e-3)
        assert abs(analytic) > 1e-9, "degenerate test: the directional meta-gradient is zero"
        assert abs(analytic - numeric) <= 1e-6 * abs(numeric), (analytic, numeric)


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_finite_difference_mode_agrees_with_exact(rule: str) -> None:
    fusion, loss, task, train, test = _setup(seed=3)
    adam_opt = _adam_optimizer(fusion) if rule == "adam" else None
    inner = InnerSGD(lr=LR_F) if rule == "sgd" else InnerAdam(lr=LR_F)
    grads = {}
    for mode in ("exact", "finite_difference"):
        meta = MetaStep(
            fusion,
            loss,
            task,
            seg_loss,
            model_optimizer=adam_opt,
            inner=inner,
            task_inner=InnerSGD(lr=LR_T),
            mode=mode,
            fd_eps=1e-5,
        )
        grads[mode] = torch.cat([g.flatten() for g in meta.hypergradient(train, test)[0].grads])
    exact, fd = grads["exact"], grads["finite_difference"]
    assert exact.norm() > 0
    assert (fd - exact).norm() <= 1e-4 * exact.norm(), ((fd - exact).norm() / exact.norm()).item()


def test_only_generator_gets_gradients_and_finite_difference_needs_no_second_order_graph() -> None:
    fusion, loss, task, train, test = _setup()
    meta = MetaStep(
        fusion, loss, task, seg_loss, inner=InnerSGD(lr=LR_F), task_inner=InnerSGD(lr=LR_T), mode="finite_difference"
    )
    result, stats = meta.hypergradient(train, test)
    assert len(result.grads) == len(list(loss.parameters()))
    assert all(p.grad is None for p in fusion.parameters())
    assert all(p.grad is None for p in task.parameters())
    assert all(p.grad is None for p in loss.parameters())
    assert stats.hypergrad_norm == pytest.approx(result.norm())
    assert len(stats.weight_mean) == 2 and abs(sum(stats.weight_mean) - 1) < 1e-6


def test_inner_adam_refuses_eps_root_zero_and_unseeded_use() -> None:
    fusion, loss, task, train, test = _setup()
    with pytest.raises(ValueError, match="eps_root"):
        MetaStep(
            fusion,
            loss,
            task,
            seg_loss,
            inner=InnerAdam(lr=1e-3, eps_root=0.0),
            task_inner=InnerSGD(lr=LR_T),
            model_optimizer=_adam_optimizer(fusion),
        ).hypergradient(train, test)
    with pytest.raises(ValueError, match="seeded"):
        MetaStep(fusion, loss, task, seg_loss, inner=InnerAdam(lr=1e-3), task_inner=InnerSGD(lr=LR_T)).hypergradient(
            train, test
        )
    with pytest.raises(ValueError, match="lr=None"):
        MetaStep(fusion, loss, task, seg_loss).hypergradient(train, test)


def test_seeded_inner_adam_equals_the_real_adam_step() -> None:
    fusion, *_ = _setup()
    opt = _adam_optimizer(fusion)
    params = tuple(p.detach().clone() for p in fusion.parameters())
    grads = tuple(torch.randn_like(p) for p in params)
    virtual = InnerAdam(eps_root=1e-30).step(params, grads, tuple(fusion.parameters()), opt)
    for p, g in zip(fusion.parameters(), grads):
        p.grad = g.clone()
    opt.step()
    for v, p in zip(virtual, fusion.parameters()):
        torch.testing.assert_close(v, p.detach(), rtol=1e-10, atol=1e-12)


def _reference_outer_loss_task_adapting(fusion, loss, task, train, test) -> torch.Tensor:
    """L_t(T'(F'(test))) with T' = T - lr dL_t(T(F'(train)))/dT: T steps on the *virtual* model's
    output, and that step is part of the function (plain autograd, SGD, buffers discarded)."""

    def call(module, params, x):
        return functional_call(module, {**params, **{n: b.clone() for n, b in module.named_buffers()}}, (x,))

    f_params = {n: p.detach().requires_grad_() for n, p in fusion.named_parameters()}
    lf = loss([train["a"], train["b"]], call(fusion, f_params, torch.cat([train["a"], train["b"]], 1))).total
    gf = torch.autograd.grad(lf, list(f_params.values()), create_graph=True)
    f_new = {n: p - LR_F * g for (n, p), g in zip(f_params.items(), gf)}
    t_params = {n: p.detach().requires_grad_() for n, p in task.named_parameters()}
    lt = seg_loss(call(task, t_params, call(fusion, f_new, torch.cat([train["a"], train["b"]], 1))), train)
    gt = torch.autograd.grad(lt, list(t_params.values()), create_graph=True)
    t_new = {n: p - LR_T * g for (n, p), g in zip(t_params.items(), gt)}
    return seg_loss(call(task, t_new, call(fusion, f_new, torch.cat([test["a"], test["b"]], 1))), test)


def test_task_adaptation_on_the_virtual_model_matches_float64_central_differences() -> None:
    """task_adaptation="virtual_model": the meta-gradient includes how the loss changes what T
    learns; checked against central differences, and the finite-difference mode against exact."""
    fusion, loss, task, train, test = _setup(seed=5)
    grads = {}
    for mode in ("exact", "finite_difference"):
        meta = MetaStep(
            fusion,
            loss,
            task,
            seg_loss,
            inner=InnerSGD(lr=LR_F),
            task_inner=InnerSGD(lr=LR_T),
            task_adaptation="virtual_model",
            mode=mode,
            fd_eps=1e-5,
        )
        grads[mode] = meta.hypergradient(train, test)[0].grads
    paper = MetaStep(fusion, loss, task, seg_loss, inner=InnerSGD(lr=LR_F), task_inner=InnerSGD(lr=LR_T))
    gen_params = list(loss.parameters())
    g = torch.Generator().manual_seed(11)
    for _ in range(2):
        direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in gen_params]
        analytic = torch.stack([(r * d).sum() for r, d in zip(grads["exact"], direction)]).sum().item()
        numeric = central_difference(
            lambda: _reference_outer_loss_task_adapting(fusion, loss, task, train, test), gen_params, direction, 1e-3
        )
        assert abs(analytic) > 1e-9
        assert abs(analytic - numeric) <= 1e-6 * abs(numeric), (analytic, numeric)
    exact, fd = (torch.cat([t.flatten() for t in grads[m]]) for m in ("exact", "finite_difference"))
    assert (fd - exact).norm() <= 1e-4 * exact.norm()
    current = torch.cat([t.flatten() for t in paper.hypergradient(train, test)[0].grads])
    assert (current - exact).norm() > 1e-3 * exact.norm(), "the option changed nothing"


class _DropoutFusion(torch.nn.Module):
    """F with dropout between two convolutions: its two evaluations must see the same draws."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(2, 6, 3, padding=1), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Conv2d(6, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_jvp_hypergradient_equals_the_double_backward_and_replays_dropout_draws() -> None:
    """hypergradient_jvp is the exact hypergradient: equal to the double backward's in float64,
    with a model that draws dropout masks (replayed in its second evaluation), and the random
    state it leaves is the one the double backward leaves."""
    _, loss, task, train, test = _setup(seed=2)
    fusion = _DropoutFusion().double()
    x_train, x_test = (torch.cat([b["a"], b["b"]], 1) for b in (train, test))
    sources = [train["a"], train["b"]]
    weights: dict[str, torch.Tensor] = {}  # the map with its graph to G, built again for each run
    names = [n for n, _ in fusion.named_parameters()]
    params = tuple(p.detach().requires_grad_() for p in fusion.parameters())
    task_params = {n: p.detach() for n, p in task.named_parameters()}

    def model(theta: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return functional_call(fusion, dict(zip(names, theta)), (x_train,))

    def output_loss(y: torch.Tensor) -> torch.Tensor:
        return loss.combine(y, sources, weights["map"]).total

    def update(theta: tuple[torch.Tensor, ...], g: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(t - LR_F * d for t, d in zip(theta, g))

    def outer_loss(theta: tuple[torch.Tensor, ...]) -> torch.Tensor:
        fused = functional_call(fusion, dict(zip(names, theta)), (x_test,))
        return seg_loss(functional_call(task, task_params, (fused,)), test)

    wrt = list(loss.parameters())
    results, states = [], []
    for route in ("double_backward", "jvp"):
        torch.manual_seed(123)
        weights["map"] = loss.weights(sources)
        if route == "jvp":
            result = hypergradient_jvp(model, output_loss, update, outer_loss, params, wrt)
        else:
            result = hypergradient(lambda t: output_loss(model(t)), update, outer_loss, params, wrt)
        results.append(torch.cat([g.flatten() for g in result.grads]))
        states.append(torch.get_rng_state())
    reference, got = results
    assert reference.norm() > 0
    torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-14)
    assert torch.equal(states[0], states[1])
    torch.manual_seed(124)  # other draws, another meta-gradient: the test can tell
    weights["map"] = loss.weights(sources)
    other = hypergradient_jvp(model, output_loss, update, outer_loss, params, wrt).grads
    assert (torch.cat([g.flatten() for g in other]) - reference).norm() > 1e-6 * reference.norm()


def test_compiled_jvp_replays_the_dropout_draws_of_the_first_evaluation() -> None:
    """MetaStep(second_order="compiled_jvp") with a model that draws dropout masks: the compiled
    product sees the eager evaluation's masks, so the meta-gradient equals the double
    backward's (float64); a product with other masks would not."""
    _, loss, task, train, test = _setup(seed=2)
    fusion = _DropoutFusion().double()
    grads = {}
    for second_order in ("double_backward", "compiled_jvp"):
        torch.manual_seed(123)
        inner, task_inner = InnerSGD(lr=LR_F), InnerSGD(lr=LR_T)
        meta = MetaStep(fusion, loss, task, seg_loss, inner=inner, task_inner=task_inner, second_order=second_order)
        assert meta.compiles_product == (second_order == "compiled_jvp")
        grads[second_order] = torch.cat([g.flatten() for g in meta.hypergradient(train, test)[0].grads])
    meta.virtual_step = "output"  # no product of F to compile there
    assert not meta.compiles_product
    reference = grads["double_backward"]
    assert reference.norm() > 0
    torch.testing.assert_close(grads["compiled_jvp"], reference, rtol=1e-9, atol=1e-13)


class _NoForwardDerivative(torch.autograd.Function):
    """tanh written as a custom function with a backward but no jvp."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _CustomTanh(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NoForwardDerivative.apply(x)


def test_second_order_is_checked_and_a_model_without_forward_derivatives_is_named() -> None:
    fusion, loss, task, train, test = _setup()
    with pytest.raises(ValueError, match="second_order"):
        MetaStep(fusion, loss, task, seg_loss, inner=InnerSGD(lr=LR_F), second_order="forward")  # type: ignore[arg-type]
    fusion.body[2] = _CustomTanh()
    meta = MetaStep(fusion, loss, task, seg_loss, inner=InnerSGD(lr=LR_F), task_inner=InnerSGD(lr=LR_T))
    with pytest.raises(NotImplementedError, match="second_order='double_backward'"):
        meta.hypergradient(train, test)
    meta.second_order = "double_backward"
    assert meta.hypergradient(train, test)[0].norm() > 0


class _AttentionFusion(torch.nn.Module):
    """F with scaled-dot-product attention over pixels: PyTorch's fused CPU kernel has no
    forward-mode derivative, so the jvp must take the composite one."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Conv2d(2, 12, 1)
        self.out = torch.nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = (t.reshape(b, 1, 4, h * w).transpose(2, 3).contiguous() for t in self.qkv(x).chunk(3, 1))
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(2, 3).reshape(b, 4, h, w))


def test_a_model_with_fused_attention_takes_the_jvp() -> None:
    _, loss, task, train, test = _setup(seed=4)
    fusion, loss, task = _AttentionFusion(), loss.float(), task.float()  # float32: the fused kernel's dtype
    train, test = ({k: v.float() if v.is_floating_point() else v for k, v in b.items()} for b in (train, test))
    grads = {}
    for second_order in ("jvp", "compiled_jvp", "double_backward"):
        inner, task_inner = InnerSGD(lr=LR_F), InnerSGD(lr=LR_T)
        meta = MetaStep(fusion, loss, task, seg_loss, inner=inner, task_inner=task_inner, second_order=second_order)
        # The double backward needs the composite kernel in any case; the jvp chooses it itself.
        context = contextlib.nullcontext() if "jvp" in second_order else sdpa_kernel(SDPBackend.MATH)
        with context:
            grads[second_order] = torch.cat([g.flatten() for g in meta.hypergradient(train, test)[0].grads])
    assert grads["double_backward"].norm() > 0
    for route in ("jvp", "compiled_jvp"):
        assert (grads[route] - grads["double_backward"]).norm() <= 1e-3 * grads["double_backward"].norm()  # float32
