"""Activation (gradient) checkpointing of a network's blocks: the blocks' activations are dropped after the forward
pass and recomputed in the backward pass, trading compute for memory.

A network names its blocks in ``_no_split_modules`` (the class names of the units that must stay whole: a
transformer block, a spatiotemporal layer). That one declaration is the network's whole sharding intent;
`loom.training.launch.apply_sharding_intent` reads it and turns it into checkpointing (here) and, under DeepSpeed
ZeRO-3, into leaf modules. A model's own ``enable_gradient_checkpointing`` calls the same function, so a network
used alone (tests, notebooks) and a network in training are checkpointed the same way.

Design choices:

- A block is checkpointed by giving it a subclass whose ``__call__`` runs the block's own ``nn.Module.__call__``
  under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, the way diffusers' models checkpoint their
  blocks (``checkpoint(block, ...)``). The recomputation goes through ``__call__`` again, so the hooks on the block
  (DeepSpeed's ZeRO-3 parameter gathering, peft's adapters inside) run for it as in the forward pass. Parameter
  and state-dict names do not change (a wrapper module would add a level: checkpoints and LoRA files would no
  longer match, and DeepSpeed would no longer recognise frozen parameters by name).
- The subclass keeps the block's class name, so whatever finds blocks by name (``_no_split_modules`` itself,
  DeepSpeed's leaf-module names, diffusers' ``compile_repeated_blocks``) finds them still, in either order.
- Only when autograd records (``torch.is_grad_enabled()``): under ``no_grad`` (sampling) there is nothing to save.
- Idempotent: checkpointing a checkpointed block changes nothing.

Single-device code: no torch.distributed, DeepSpeed or Lightning here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_SUBCLASSES: dict[type, type] = {}


def _checkpointed_class(base: type) -> type:
    cls = _SUBCLASSES.get(base)
    if cls is not None:
        return cls

    def __call__(self, *args, **kwargs):
        call = super(cls, self).__call__
        if torch.is_grad_enabled():
            return checkpoint(call, *args, use_reentrant=False, **kwargs)
        return call(*args, **kwargs)

    cls = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                        "__qualname__": base.__qualname__, "_checkpointed_base": base})
    _SUBCLASSES[base] = cls
    return cls


def is_checkpointed(module: nn.Module) -> bool:
    return "_checkpointed_base" in vars(type(module))


def block_class_name(module: nn.Module) -> str:
    """The class name a block is declared by in ``_no_split_modules`` (the same whether checkpointed or not)."""
    return type(module).__name__


def find_blocks(network: nn.Module, names: list[str] | tuple[str, ...]) -> list[nn.Module]:
    """The submodules of ``network`` whose class is named in ``names`` (exact class names, not subclasses)."""
    wanted = set(names)
    return [m for m in network.modules() if m is not network and block_class_name(m) in wanted]


def declared_blocks(network: nn.Module) -> list[nn.Module]:
    """The blocks ``network`` declares in ``_no_split_modules``; a declaration that matches no submodule is an
    error (a renamed class would otherwise turn checkpointing and ZeRO-3 leaves off without a word)."""
    names = list(getattr(network, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(network).__name__} declares no _no_split_modules: name its block classes there "
                         "(the units that checkpointing recomputes and ZeRO-3 gathers whole)")
    blocks = find_blocks(network, names)
    if not blocks:
        present = sorted({block_class_name(m) for m in network.modules()} - {type(network).__name__})
        raise ValueError(f"{type(network).__name__}._no_split_modules = {names} matches no submodule; its module "
                         f"classes are {present[:12]}{' ...' if len(present) > 12 else ''}: fix the declaration")
    return blocks


def checkpoint_blocks(network: nn.Module) -> list[nn.Module]:
    """Checkpoint every block ``network`` declares in ``_no_split_modules``; returns the blocks."""
    blocks = declared_blocks(network)
    for block in blocks:
        if not is_checkpointed(block):
            block.__class__ = _checkpointed_class(type(block))
    return blocks


def uncheckpoint_blocks(network: nn.Module) -> None:
    """Undo `checkpoint_blocks`."""
    for block in network.modules():
        if is_checkpointed(block):
            block.__class__ = vars(type(block))["_checkpointed_base"]
