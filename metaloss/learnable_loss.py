"""The learnable loss: a generator network that weighs K sources, and weighted loss terms.

A ``LearnableLoss`` owns the loss generator ``G`` (its parameters are the meta-learned
ones) and a set of named, weighted loss terms. Given the K sources and a model's prediction it
returns a scalar loss whose value depends on ``G``'s per-pixel weight maps ``w_1..w_K``
(``sum_k w_k = 1`` at every pixel).

References:
    Bai et al., "Task-driven Image Fusion with Learnable Fusion Loss", CVPR 2025, eq. (1)-(3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = [
    "ConstantWeights",
    "GlobalWeights",
    "LearnableLoss",
    "LossOutput",
    "LossTerm",
    "check_source_weights",
    "check_sources",
    "check_weight_map",
    "weight_statistics",
]


@runtime_checkable
class LossTerm(Protocol):
    """One term of a learnable loss.

    A term maps the prediction, the K sources and the weight map ``(B, K, ...)`` to a scalar.
    Terms that do not use the weights simply ignore them.

    Examples:
        >>> import torch
        >>> def weighted_l1(prediction, sources, weights):  # sum_k w_k |F - I_k|, averaged
        ...     stacked = torch.stack(list(sources), dim=1)  # (B, K, C, H, W)
        ...     return (weights.unsqueeze(2) * (prediction.unsqueeze(1) - stacked).abs()).sum(1).mean()
        >>> isinstance(weighted_l1, LossTerm)
        True
    """

    def __call__(self, prediction: Tensor, sources: Sequence[Tensor], weights: Tensor) -> Tensor:
        """Return the scalar value of this term."""
        ...


@dataclass(frozen=True)
class LossOutput:
    """What a learnable loss returns.

    Attributes:
        total: the scalar loss, float32 (float64 when the inputs are float64).
        weights: the weight map ``(B, K, ...)`` that produced it.
        terms: each term's unweighted scalar value, by name.

    Examples:
        >>> import torch
        >>> loss = LearnableLoss(ConstantWeights(2), {"l1": lambda f, s, w: (f - s[0]).abs().mean()})
        >>> out = loss([torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)], torch.ones(1, 1, 4, 4))
        >>> float(out.total), sorted(out.terms), tuple(out.weights.shape)
        (1.0, ['l1'], (1, 2, 4, 4))
    """

    total: Tensor
    weights: Tensor
    terms: dict[str, Tensor]


def check_sources(sources: Sequence[Tensor]) -> None:
    """Raise ``ValueError`` unless ``sources`` are at least two tensors of one shape.

    Args:
        sources: the K source tensors, each ``(B, C, ...)``.

    Examples:
        >>> import torch
        >>> check_sources([torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5)])
        Traceback (most recent call last):
        ...
        ValueError: sources must share one shape: source 0 is (1, 1, 4, 4), source 1 is (1, 1, 4, 5)
    """
    if len(sources) < 2:
        raise ValueError(f"a learnable loss needs at least 2 sources, got {len(sources)}")
    first = tuple(sources[0].shape)
    for k, source in enumerate(sources):
        if not isinstance(source, Tensor):
            raise TypeError(f"source {k} is a {type(source).__name__}, not a torch.Tensor")
        if tuple(source.shape) != first:
            raise ValueError(f"sources must share one shape: source 0 is {first}, source {k} is {tuple(source.shape)}")


def check_weight_map(weights: Tensor, sources: Sequence[Tensor], atol: float | None = None) -> None:
    """Raise ``ValueError`` unless ``weights`` is a valid K-way weight map for ``sources``.

    Valid means: shape ``(B, K, *spatial)`` matching the sources' batch and spatial size,
    finite, non-negative, and summing to 1 over ``K`` at every position (within ``atol``;
    default 1e-3, or a few units of rounding for half-precision weights).

    Examples:
        >>> import torch
        >>> sources = [torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4)]
        >>> check_weight_map(torch.full((1, 2, 4, 4), 0.5), sources)  # valid: no error
        >>> check_weight_map(torch.full((1, 2, 4, 4), 0.6), sources)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ...sum to 1...
    """
    if atol is None:  # a softmax rounded to bf16 or fp16 is off by a few units of its precision
        atol = max(1e-3, 8 * torch.finfo(weights.dtype).eps) if weights.is_floating_point() else 1e-3
    k = len(sources)
    ref = sources[0]
    expected = (ref.shape[0], k, *ref.shape[2:])
    if tuple(weights.shape) != tuple(expected):
        raise ValueError(
            f"the generator's output is not a valid weight map: expected shape {tuple(expected)} "
            f"(batch, {k} sources, spatial), got {tuple(weights.shape)}"
        )
    with torch.no_grad():
        w = weights.detach().float()
        if not bool(torch.isfinite(w).all()):
            raise ValueError("the generator's output is not a valid weight map: non-finite values")
        if bool((w < -atol).any()):
            raise ValueError(
                "the generator's output is not a valid weight map: negative weights "
                f"(min {w.min().item():.3g}); use weights='softmax' or end the generator in a Softmax"
            )
        err = (w.sum(dim=1) - 1).abs().max().item()
        if err > atol:
            raise ValueError(
                "the generator's output is not a valid weight map: weights do not sum to 1 over "
                f"the {k} sources (max deviation {err:.3g}); use weights='softmax' or end the "
                "generator in a Softmax over dim 1"
            )


def check_source_weights(
    weights: Sequence[float], num_sources: int | None = None, *, positive: bool = False, name: str = "weights"
) -> tuple[float, ...]:
    """Check fixed per-source weights (one number per source, as a weight map holds at a pixel).

    Args:
        weights: one weight per source.
        num_sources: K, if the count is known; ``None`` checks no count.
        positive: ask for weights above 0 (a logarithm is taken of them) rather than at least 0.
        name: what the error calls the weights.

    Returns:
        The weights as a tuple of floats.

    Raises:
        ValueError: if there are not ``num_sources`` of them, one is not finite, is negative (or
            not positive, with ``positive``), or they do not sum to 1 (within 1e-6).

    Examples:
        >>> check_source_weights([0.75, 0.25])
        (0.75, 0.25)
        >>> check_source_weights([0.7, 0.7])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: weights must sum to 1 (a weight map does), got (0.7, 0.7) (sum 1.4)
    """
    values = tuple(float(w) for w in weights)
    if num_sources is not None and len(values) != num_sources:
        raise ValueError(f"{name} must have one entry per source ({num_sources}), got {len(values)}: {values}")
    if not all(math.isfinite(w) and (w > 0 if positive else w >= 0) for w in values):
        raise ValueError(f"{name} must be finite and {'positive' if positive else 'non-negative'}, got {values}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1 (a weight map does), got {values} (sum {sum(values):g})")
    return values


def weight_statistics(weights: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation of each source's weight over a ``(B, K, ...)`` weight map.

    Examples:
        >>> import torch
        >>> w = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (B=1, K=2, 1, 2)
        >>> weight_statistics(w)
        ((0.5, 0.5), (0.7071067690849304, 0.7071067690849304))
    """
    per_source = weights.detach().float().transpose(0, 1).reshape(weights.shape[1], -1)
    return tuple(per_source.mean(dim=1).tolist()), tuple(per_source.std(dim=1).tolist())


class ConstantWeights(nn.Module):
    """A generator without parameters that gives each source a fixed weight, ``1/K`` by default.

    With it a ``LearnableLoss`` becomes a fixed loss: the paper's ablation I with the default
    weights, or any fixed weighting of the sources (``weights=(1.0, 0.0)``: the first source only),
    the baselines a learned loss should beat.

    Args:
        num_sources: K.
        weights: one non-negative weight per source, the same at every pixel, summing to 1 as
            every weight map does (``check_source_weights``); ``None``: ``1/K`` each.

    Raises:
        ValueError: if ``num_sources < 2``, or ``weights`` has not K entries, has a negative or
            non-finite one, or does not sum to 1.

    Examples:
        >>> import torch
        >>> ConstantWeights(2)(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2))[0, :, 0, 0]
        tensor([0.5000, 0.5000])
        >>> ConstantWeights(2, weights=(1.0, 0.0))(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2))[0, :, 0, 0]
        tensor([1., 0.])
    """

    def __init__(self, num_sources: int = 2, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if num_sources < 2:
            raise ValueError(f"num_sources must be >= 2, got {num_sources}")
        if weights is None:
            weights = (1.0 / num_sources,) * num_sources
        self.num_sources = num_sources
        self.weights = check_source_weights(weights, num_sources)

    def forward(self, *sources: Tensor) -> Tensor:
        """Return ``(B, K, *spatial)`` with channel ``k`` filled with ``weights[k]``."""
        ref = sources[0]
        shape = (ref.shape[0], 1, *ref.shape[2:])
        return torch.cat([torch.full(shape, w, dtype=ref.dtype, device=ref.device) for w in self.weights], dim=1)

    def extra_repr(self) -> str:
        return f"num_sources={self.num_sources}, weights={self.weights}"


class GlobalWeights(nn.Module):
    """A generator of one learnable logit per source, the same at every pixel.

    A learned *global* weighting: the baseline a per-pixel generator should beat, and the
    smallest generator to try the engine with. The logits start at 0 (weights ``1/K``).

    Args:
        num_sources: K.

    Examples:
        >>> import torch
        >>> loss = LearnableLoss(GlobalWeights(2), {"l2": lambda f, s, w: (w * (f - torch.cat(s, 1)) ** 2).mean()})
        >>> loss.weights([torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4)])[0, :, 0, 0]
        tensor([0.5000, 0.5000], grad_fn=<SelectBackward0>)
        >>> [name for name, _ in loss.named_parameters()]
        ['generator.logits']
    """

    def __init__(self, num_sources: int = 2) -> None:
        super().__init__()
        if num_sources < 2:
            raise ValueError(f"num_sources must be >= 2, got {num_sources}")
        self.logits = nn.Parameter(torch.zeros(num_sources))

    def forward(self, *sources: Tensor) -> Tensor:
        """Return the logits as ``(B, K, *spatial)``, constant over the spatial dimensions."""
        ref = sources[0]
        shape = (ref.shape[0], self.logits.numel(), *ref.shape[2:])
        return self.logits.to(ref.dtype).view(1, -1, *([1] * (ref.dim() - 2))).expand(shape)


class LearnableLoss(nn.Module):
    """A loss whose per-pixel source weights come from a trainable generator.

    ``loss = sum_name coefficient[name] * term[name](prediction, sources, weights)`` with
    ``weights = normalise(generator(*sources))`` of shape ``(B, K, *spatial)``.

    Args:
        generator: module called as ``generator(*sources)``; returns K-channel logits
            (``weights="softmax"``) or a weight map that already sums to 1 over dim 1
            (``weights="given"``, e.g. a generator ending in ``nn.Softmax(dim=1)``).
        terms: named loss terms (see ``LossTerm``).
        coefficients: a scalar per term name; missing names weigh 1.
        weights: how the generator's output becomes weights.
        validate: check sources and weight maps on every call (cheap; raises ``ValueError``).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> class Generator(nn.Module):  # the K sources in, K logit maps out
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = nn.Conv2d(2, 2, 3, padding=1)
        ...     def forward(self, a, b):
        ...         return self.conv(torch.cat([a, b], dim=1))
        >>> def intensity(prediction, sources, weights):  # sum_k w_k (F - I_k)^2, averaged
        ...     stacked = torch.stack(list(sources), dim=1)
        ...     return (weights.unsqueeze(2) * (prediction.unsqueeze(1) - stacked) ** 2).sum(1).mean()
        >>> loss = LearnableLoss(Generator(), {"intensity": intensity})
        >>> ir, vis, fused = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
        >>> out = loss([ir, vis], fused)
        >>> out.total.backward()  # gradients reach the generator (and the prediction, if it has a graph)
        >>> loss.weights([ir, vis]).sum(dim=1).allclose(torch.ones(2, 8, 8))
        True
    """

    def __init__(
        self,
        generator: nn.Module,
        terms: Mapping[str, LossTerm],
        coefficients: Mapping[str, float] | None = None,
        *,
        weights: Literal["softmax", "given"] = "softmax",
        validate: bool = True,
    ) -> None:
        super().__init__()
        if not terms:
            raise ValueError("a learnable loss needs at least one term")
        unknown = set(coefficients or {}) - set(terms)
        if unknown:
            raise ValueError(f"coefficients name unknown terms {sorted(unknown)}; terms are {sorted(terms)}")
        if weights not in ("softmax", "given"):
            raise ValueError(f"weights must be 'softmax' or 'given', got {weights!r}")
        self.generator = generator
        # Module terms are registered, so .to(), .double() and state_dict() reach their tensors.
        self.term_modules = nn.ModuleDict({k: v for k, v in terms.items() if isinstance(v, nn.Module)})
        self.terms = dict(terms)
        self.coefficients = {name: float((coefficients or {}).get(name, 1.0)) for name in terms}
        self.weight_mode = weights
        self.validate = validate

    def weights(self, sources: Sequence[Tensor]) -> Tensor:
        """Return the weight map ``(B, K, *spatial)`` for ``sources``."""
        if self.validate:
            check_sources(sources)
        out = self.generator(*sources)
        if self.weight_mode == "softmax":
            # Half-precision logits (autocast) are normalised and kept in float32: the weights
            # enter float32 losses, and bf16 rounding alone breaks sum-to-1 by ~4e-3.
            out = torch.softmax(out, dim=1, dtype=torch.promote_types(out.dtype, torch.float32))
        if self.validate:
            check_weight_map(out, sources)
        return out

    def combine(self, prediction: Tensor, sources: Sequence[Tensor], weights: Tensor) -> LossOutput:
        """Evaluate the weighted terms for given weights (terms in float32 or float64)."""
        dtype = torch.float64 if prediction.dtype == torch.float64 else torch.float32
        pred = prediction.to(dtype)
        srcs = [s.to(dtype) for s in sources]
        w = weights.to(dtype)
        values = {name: term(pred, srcs, w) for name, term in self.terms.items()}
        total = sum(
            (self.coefficients[name] * value for name, value in values.items()),
            start=torch.zeros((), dtype=dtype, device=pred.device),
        )
        return LossOutput(total=total, weights=weights, terms=values)

    def forward(self, sources: Sequence[Tensor], prediction: Tensor, *, detach_weights: bool = False) -> LossOutput:
        """Return the loss of ``prediction`` given ``sources``.

        Args:
            sources: the K source tensors.
            prediction: the model's output.
            detach_weights: compute the weights without a graph to the generator (the model's
                ordinary training phase, where only the model learns).
        """
        if detach_weights:
            with torch.no_grad():
                weights = self.weights(sources)
        else:
            weights = self.weights(sources)
        return self.combine(prediction, sources, weights)
