"""launch.apply_sharding_intent: the networks' ``_no_split_modules`` turned into gradient checkpointing of exactly
those blocks and, under DeepSpeed ZeRO-3, leaf modules; applied by ``fit`` to the module it trains."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from loom.models.checkpointing import is_checkpointed
from loom.models.shape4d_dit import Shape4DDiT
from loom.models.ttv_dit import TTVDiT
from loom.platform.tracking import TrackingSettings
from loom.training import launch
from loom.training.launch import TrainerSettings, apply_sharding_intent


class Holder(nn.Module):
    """Stands in for a LightningModule: a trained network beside a module that declares nothing."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit
        self.head = nn.Linear(4, 4)


def _forward_counts(model: nn.Module, run) -> dict[str, int]:
    """How often each submodule's forward ran during ``run()`` (forward and backward)."""
    counts: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
             for name, m in model.named_modules() if name]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return counts


def _shape4d_step(model: Shape4DDiT) -> None:
    g = torch.Generator().manual_seed(0)
    x = dict(latents=torch.randn(2, 3, 6, 8, generator=g), timestep=torch.tensor([300.0, 800.0]),
             image_tokens=torch.randn(2, 3, 5, 24, generator=g))
    with torch.no_grad():
        for layer in model.spatiotemporal_layers:  # so gradients reach inside the zero-initialised layers
            layer.proj_out.weight.normal_(std=0.1, generator=g)
    model(**x).square().mean().backward()


def test_gradient_checkpointing_recomputes_exactly_the_declared_blocks():
    holder = Holder(Shape4DDiT.tiny())
    declared = set(Shape4DDiT._no_split_modules)
    applied = apply_sharding_intent(holder, TrainerSettings(gradient_checkpointing=True, strategy="ddp"))
    assert applied == {"dit": sorted(declared)}
    blocks = {n for n, m in holder.dit.named_modules() if type(m).__name__ in declared}
    assert {n for n, m in holder.dit.named_modules() if is_checkpointed(m)} == blocks
    assert not is_checkpointed(holder.head) and not is_checkpointed(holder.dit)
    # A checkpointed block runs twice in a training step (forward, then recomputed in backward), the rest once.
    counts = _forward_counts(holder.dit, lambda: _shape4d_step(holder.dit))
    assert {n for n, c in counts.items() if c == 2 and "." not in n.partition(".")[2]} == blocks
    assert all(c == 1 for n, c in counts.items() if n in {"proj_in", "proj_cross_attention", "time_proj", "proj_out", "norm_out"})
    assert {"proj_in", "proj_cross_attention", "time_proj", "proj_out", "norm_out"} <= set(counts)  # names exist


def test_gradient_checkpointing_off_changes_nothing():
    holder = Holder(Shape4DDiT.tiny())
    apply_sharding_intent(holder, TrainerSettings(gradient_checkpointing=False, strategy="ddp"))
    assert not any(is_checkpointed(m) for m in holder.modules())


def test_gradient_checkpointing_keeps_names_and_gradients():
    plain, checkpointed = Shape4DDiT.tiny(), Shape4DDiT.tiny()
    names = list(plain.state_dict())
    apply_sharding_intent(Holder(checkpointed), TrainerSettings(gradient_checkpointing=True, strategy="ddp"))
    assert list(checkpointed.state_dict()) == names  # checkpoints and weight files keep their keys
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    _shape4d_step(plain)
    _shape4d_step(checkpointed)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_checkpointing_of_the_video_dit_with_lora():
    """The Wan blocks (inside diffusers' transformer, which declares them too: only the outer network counts) are
    checkpointed with their LoRA layers inside; the fusion module is not."""
    dit = TTVDiT.tiny()
    dit.add_lora(rank=4)
    applied = apply_sharding_intent(Holder(dit), TrainerSettings(gradient_checkpointing=True, strategy="ddp"))
    assert applied == {"dit": ["WanTransformerBlock"]}
    checkpointed = [n for n, m in dit.named_modules() if is_checkpointed(m)]
    assert checkpointed == ["transformer.blocks.0", "transformer.blocks.1"]
    assert not dit.transformer.gradient_checkpointing  # diffusers' own flag stays off: no second checkpoint


def test_gradient_checkpointing_without_a_declaring_network_is_refused():
    with pytest.raises(ValueError, match=r"trainer.gradient_checkpointing=true.*no network in Holder declares"):
        apply_sharding_intent(Holder(nn.Linear(4, 4)), TrainerSettings(gradient_checkpointing=True, strategy="ddp"))


def test_a_declaration_that_matches_no_block_is_refused():
    class Misnamed(nn.Module):
        _no_split_modules = ["Blokc"]

        def __init__(self):
            super().__init__()
            self.block = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"Misnamed._no_split_modules = \['Blokc'\] matches no submodule.*Linear"):
        apply_sharding_intent(Holder(Misnamed()), TrainerSettings(gradient_checkpointing=True, strategy="ddp"))


@pytest.fixture
def fake_deepspeed(monkeypatch):
    """A ``deepspeed.utils`` whose set_z3_leaf_modules records its calls."""
    calls = []
    utils = types.ModuleType("deepspeed.utils")
    utils.set_z3_leaf_modules = lambda model, classes: calls.append((model, list(classes)))
    ds = types.ModuleType("deepspeed")
    ds.utils = utils
    monkeypatch.setitem(sys.modules, "deepspeed", ds)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", utils)
    return calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_zero3_registers_the_declared_blocks_as_leaves(fake_deepspeed, checkpointing):
    holder = Holder(Shape4DDiT.tiny())
    apply_sharding_intent(holder, TrainerSettings(strategy="deepspeed", zero_stage=3,
                                                  gradient_checkpointing=checkpointing))
    assert fake_deepspeed == [(holder.dit, sorted(Shape4DDiT._no_split_modules))]


@pytest.mark.parametrize("trainer", [TrainerSettings(strategy="deepspeed", zero_stage=2),
                                     TrainerSettings(strategy="ddp", zero_stage=3)])
def test_no_leaves_without_zero3(fake_deepspeed, trainer):
    apply_sharding_intent(Holder(Shape4DDiT.tiny()), trainer)
    assert fake_deepspeed == []


def test_zero3_leaf_flags_with_real_deepspeed():
    pytest.importorskip("deepspeed")
    from deepspeed.utils import get_z3_leaf_modules

    holder = Holder(Shape4DDiT.tiny())
    apply_sharding_intent(holder, TrainerSettings(strategy="deepspeed", zero_stage=3, gradient_checkpointing=True))
    leaves = get_z3_leaf_modules(holder)
    assert leaves and {type(m).__name__ for m in leaves} == set(Shape4DDiT._no_split_modules)
    assert {id(m) for m in leaves} == {id(m) for m in holder.modules() if is_checkpointed(m)}


def test_fit_applies_the_intent_before_training(tmp_path, monkeypatch):
    seen = {}

    class FakeTrainer:
        def fit(self, module, train_dataloaders=None, ckpt_path=None, weights_only=None):
            seen["weights_only"] = weights_only
            seen["checkpointed"] = [n for n, m in module.named_modules() if is_checkpointed(m)]

    monkeypatch.setattr(launch, "build_trainer", lambda *a, **k: FakeTrainer())
    t = TrainerSettings(gradient_checkpointing=True, strategy="ddp")
    launch.fit(lambda: (Holder(TTVDiT.tiny()), []), t, TrackingSettings(enabled=False), str(tmp_path))
    assert seen["checkpointed"] == ["dit.transformer.blocks.0", "dit.transformer.blocks.1"]
    assert seen["weights_only"] is True  # Lightning reads its own checkpoint files with weights_only=True
