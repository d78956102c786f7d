"""The learnable loss: a generator network that weighs K sources, and weighted loss terms.

A ``LearnableLoss`` owns the loss generator ``G`` (its parameters are the meta-learned
ones) and a set of named, weighted loss terms. Given the K sources and a model's prediction it
returns a scalar loss whose value depends on ``G``'s per-pixel weight maps ``w_1..w_K``
(``sum_k w_k = 1`` at every pixel).

References:
    Bai et al., "Task-driven Image Fusion with Learnable Fusion Loss", CVPR 2025, eq. (1)-(3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = [
    "ConstantWeights",
    "LearnableLoss",
    "LossOutput",
    "LossTerm",
    "check_sources",
    "check_weight_map",
    "weight_statistics",
]


@runtime_checkable
class LossTerm(Protocol):
    """One term of a learnable loss.

    A term maps the prediction, the K sources and the weight map ``(B, K, ...)`` to a scalar.
    Terms that do not use the weights simply ignore them.
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
    """

    total: Tensor
    weights: Tensor
    terms: dict[str, Tensor]


def check_sources(sources: Sequence[Tensor]) -> None:
    """Raise ``ValueError`` unless ``sources`` are at least two tensors of one shape.

    Args:
        sources: the K source tensors, each ``(B, C, ...)``.
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


def weight_statistics(weights: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation of each source's weight over a ``(B, K, ...)`` weight map."""
    per_source = weights.detach().float().transpose(0, 1).reshape(weights.shape[1], -1)
    return tuple(per_source.mean(dim=1).tolist()), tuple(per_source.std(dim=1).tolist())


class ConstantWeights(nn.Module):
    """A generator without parameters that gives every source the same weight ``1/K``.

    With it a ``LearnableLoss`` becomes a fixed loss (the paper's ablation I).

    Args:
        num_sources: K.
    """

    def __init__(self, num_sources: int = 2) -> None:
        super().__init__()
        if num_sources < 2:
            raise ValueError(f"num_sources must be >= 2, got {num_sources}")
        self.num_sources = num_sources

    def forward(self, *sources: Tensor) -> Tensor:
        """Return ``(B, K, *spatial)`` filled with ``1/K``."""
        ref = sources[0]
        shape = (ref.shape[0], self.num_sources, *ref.shape[2:])
        return torch.full(shape, 1.0 / self.num_sources, dtype=ref.dtype, device=ref.device)


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

    Example:
        >>> loss = LearnableLoss(my_generator, {"int": intensity_term}, weights="softmax")
        >>> out = loss([ir, vis], fused)
        >>> out.total.backward()
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
