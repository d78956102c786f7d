"""Activation checkpointing inside a model that a meta step runs with other parameters.

A meta step runs the user's networks through ``torch.func.functional_call`` with parameters
that are not the modules' own (``StatelessModule``: the virtual ``theta'`` of ``F``, the virtual
step of ``T``). ``torch.utils.checkpoint`` recomputes a region's activations in the backward
pass by calling the region's function again, after the functional call has put the module's
own parameters back: the recomputation then uses the wrong parameters, and the gradient is
silently wrong, or the backward fails with a ``CheckpointError`` about recomputed tensors'
metadata (as Hugging Face's ``activation_checkpointing_enable()`` does on SegFormer, measured
with torch 2.15 and transformers 5.23). ``checkpointed_call`` hands the module's parameters
to the checkpoint as inputs (and holds its buffers), so the recomputation uses the tensors the
forward pass used, whatever they were. ``internal_checkpointing`` finds the checkpointing that
the common libraries switch on by a flag, which ``StatelessModule`` refuses.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.func import functional_call

__all__ = ["CHECKPOINTING_FLAGS", "checkpointed_call", "internal_checkpointing"]

CHECKPOINTING_FLAGS: tuple[str, ...] = ("gradient_checkpointing", "grad_checkpointing")
"""Attributes by which libraries switch on a submodule's activation checkpointing: Hugging Face
``transformers`` and ``diffusers`` (``gradient_checkpointing``), ``timm``
(``grad_checkpointing``)."""


def checkpointed_call(module: nn.Module, *args: Any) -> Any:
    """``module(*args)``, its activations recomputed in the backward pass instead of kept.

    Like ``torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)``, except that
    the module's parameters, as they are during this call, are inputs of the checkpoint, and
    its buffers are held: the recomputation runs the module with them
    (``torch.func.functional_call``), so it stays correct when the call itself runs under a
    functional call with other parameters, as every forward pass of a meta step does. Call it
    in your model's ``forward`` on the parts whose activations you do not want kept (for
    instance each block of a stage); the part's own ``forward`` must not call it on itself.
    Where no graph is recorded it is ``module(*args)``. Random draws are replayed in the
    recomputation (``preserve_rng_state``); buffers a forward pass writes (BatchNorm's running
    statistics) are written again, as with ``torch.utils.checkpoint``.

    Args:
        module: the part of the model to checkpoint.
        *args: its inputs.

    Returns:
        ``module(*args)``.

    Examples:
        Under a functional call with parameters that are not the module's own, the gradient is
        that of the plain call; ``torch.utils.checkpoint`` recomputes with the module's own:

        >>> import torch
        >>> from torch.func import functional_call
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh())
        ...         self.checkpoint = None
        ...     def forward(self, x):
        ...         return self.checkpoint(self.layer, x) if self.checkpoint else self.layer(x)
        >>> net, x = Net(), torch.randn(2, 3)
        >>> other = {k: (2 * v.detach()).requires_grad_() for k, v in net.named_parameters()}
        >>> def grads():
        ...     out = functional_call(net, other, (x,)).square().sum()
        ...     return torch.cat([g.flatten() for g in torch.autograd.grad(out, list(other.values()))])
        >>> plain = grads()
        >>> net.checkpoint = checkpointed_call
        >>> torch.allclose(grads(), plain)
        True
        >>> net.checkpoint = lambda m, x: torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False)
        >>> torch.allclose(grads(), plain)
        False

    References:
        Chen et al., "Training deep nets with sublinear memory cost", arXiv:1604.06174, 2016.
    """
    if not torch.is_grad_enabled():
        return module(*args)
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())  # not inputs: a forward pass may write them in place
    names, count = tuple(params), len(args)

    def run(*inputs: Any) -> Any:
        state = {**dict(zip(names, inputs[count:], strict=True)), **buffers}
        return functional_call(module, state, inputs[:count])

    return torch.utils.checkpoint.checkpoint(run, *args, *params.values(), use_reentrant=False)


def internal_checkpointing(module: nn.Module) -> list[str]:
    """The submodules of ``module`` (dotted names, ``""`` for itself) in training mode whose
    activation checkpointing is on by one of ``CHECKPOINTING_FLAGS``: the checkpointing that a
    meta step's functional calls would recompute with the wrong parameters.

    Examples:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> net[1].gradient_checkpointing = True  # as transformers' activation_checkpointing_enable() does
        >>> internal_checkpointing(net)
        ['1']
        >>> internal_checkpointing(net.eval())  # the libraries checkpoint in training mode only
        []
    """
    if not any(map(_checkpointing, module.modules())):  # checked at every call of a meta step's views
        return []
    return [name for name, sub in module.named_modules() if _checkpointing(sub)]


def _checkpointing(module: nn.Module) -> bool:
    # A flag is a plain attribute (in the instance's __dict__); a missing one read through
    # nn.Module.__getattr__ would raise and catch an AttributeError for each module, 0.5 ms a call.
    return module.training and any(vars(module).get(flag) is True for flag in CHECKPOINTING_FLAGS)
