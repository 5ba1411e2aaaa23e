"""Contract tests every model inherits (diffusers' ModelTesterMixin, tests/models/test_modeling_common.py): a test
class for a model subclasses these mixins and says how to build the tiny model and its dummy inputs; the mixins
bring the tests.

- `ModelContract`: output shape and dtype, determinism (same seed, same weights and outputs; another seed, other
  outputs; the global RNG left alone), save/load round trip.
- `TrainableContract` (adds to ModelContract): backward gives finite gradients to every trainable parameter.
- `FrozenPartsContract` (adds to TrainableContract): frozen parameters stay frozen (no gradient, bit-identical after
  optimizer steps) while the trained ones move.
- `BlocksContract` (adds to TrainableContract): the blocks named in ``_no_split_modules`` exist, and checkpointing
  them recomputes them and gives the same gradients.
- `FrozenEncoderContract` (adds to ModelContract): every parameter is frozen, and encoding records no graph.

A subclass defines ``make_model(seed)``, ``make_inputs(seed)`` and ``output_shape``; it overrides ``forward``,
``save``/``load``, ``prepare_training`` and ``loss`` where its model differs. ``self.tmp_path`` is a fresh folder.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn


class ModelContract:
    output_shape: tuple[int, ...]
    output_dtype = torch.float32
    # Whether make_model(seed) leaves the global RNG as it was (the models' tiny(seed) do).
    leaves_global_rng = True
    # Outputs of a loaded model may differ in the last bit (safetensors tensors are not 64-byte aligned, and the CPU
    # BLAS picks another kernel for them).
    round_trip_atol = 0.0

    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path):
        self.tmp_path = tmp_path

    # ------------------------------------------------------------------ what a model's test class provides

    def make_model(self, seed: int = 0) -> nn.Module:
        raise NotImplementedError

    def make_inputs(self, seed: int = 0) -> dict[str, Any]:
        raise NotImplementedError

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        return model(**inputs)

    def save(self, model: nn.Module, path) -> None:
        model.save_pretrained(str(path))

    def load(self, model: nn.Module, path) -> nn.Module:
        return type(model).from_pretrained(str(path))

    # ------------------------------------------------------------------ the contract

    def test_contract_output_shape_and_dtype(self):
        out = self.forward(self.make_model(), self.make_inputs())
        assert tuple(out.shape) == tuple(self.output_shape)
        assert out.dtype == self.output_dtype
        assert torch.isfinite(out).all()

    def test_contract_determinism(self):
        state = torch.random.get_rng_state()
        a, b, c = self.make_model(0), self.make_model(0), self.make_model(1)
        if self.leaves_global_rng:
            assert torch.equal(torch.random.get_rng_state(), state)
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        inputs = self.make_inputs()
        out = self.forward(a, inputs)
        assert torch.equal(out, self.forward(b, inputs))
        assert torch.equal(out, self.forward(a, inputs))  # no state carried from one call to the next
        assert not torch.allclose(out, self.forward(c, inputs))
        assert not torch.allclose(out, self.forward(a, self.make_inputs(seed=1)))  # the inputs reach the output

    def test_contract_save_load_round_trip(self):
        model = self.make_model(seed=2)
        self.save(model, self.tmp_path / "saved")
        loaded = self.load(model, self.tmp_path / "saved")
        state, loaded_state = model.state_dict(), loaded.state_dict()
        assert state.keys() == loaded_state.keys()
        assert all(torch.equal(state[k], loaded_state[k]) for k in state)
        inputs = self.make_inputs()
        with torch.no_grad():
            torch.testing.assert_close(self.forward(loaded, inputs), self.forward(model, inputs),
                                       atol=self.round_trip_atol, rtol=0)


class TrainableContract(ModelContract):
    optimizer_steps = 2  # enough for every trainable parameter to move (a zero-initialised projection: step 2)

    def prepare_training(self, model: nn.Module) -> nn.Module:
        """The model as training uses it (LoRA added, base frozen, zero-initialised parts perturbed)."""
        return model

    def loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        return self.forward(model, inputs).square().mean()

    def _trained(self, seed: int = 0) -> nn.Module:
        model = self.prepare_training(self.make_model(seed))
        model.train()
        return model

    def test_contract_backward_gives_finite_grads_to_every_trainable_parameter(self):
        model = self._trained()
        self.loss(model, self.make_inputs()).backward()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert trainable
        for name, p in trainable:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
        assert any(p.grad.abs().sum() > 0 for _, p in trainable)


class FrozenPartsContract(TrainableContract):
    """For a model trained with part of it frozen (a LoRA'd base, a frozen base under new layers)."""

    def test_contract_frozen_parameters_stay_frozen(self):
        model = self._trained()
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen, f"{type(model).__name__} as prepare_training leaves it has no frozen parameter"
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        for step in range(self.optimizer_steps):
            opt.zero_grad()
            self.loss(model, self.make_inputs(seed=step)).backward()
            opt.step()
        for name, p in model.named_parameters():
            if name in frozen:
                assert p.grad is None, name
                assert torch.equal(p, frozen[name]), name
        assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)


class BlocksContract(TrainableContract):
    """For a model that declares its blocks in ``_no_split_modules`` (its sharding intent: the units gradient
    checkpointing recomputes and ZeRO-3 gathers whole; applied by loom.training.launch.apply_sharding_intent)."""

    def test_contract_no_split_modules_name_blocks_of_the_model(self):
        names = list(getattr(self.make_model(), "_no_split_modules", None) or [])
        assert names, f"{type(self.make_model()).__name__} declares no _no_split_modules"
        present = {type(m).__name__ for m in self.make_model().modules()}
        assert set(names) <= present, f"declared {names}, the model has {sorted(present)}"

    def test_contract_checkpointed_blocks_are_recomputed_with_the_same_grads(self):
        from loom.models.checkpointing import checkpoint_blocks, is_checkpointed

        names = set(getattr(self.make_model(), "_no_split_modules", None) or [])
        assert names
        inputs, grads, runs = self.make_inputs(), [], []
        for checkpointing in (False, True):
            model = self._trained()
            if checkpointing:
                checkpoint_blocks(model)
                assert {n for n, m in model.named_modules() if is_checkpointed(m)} == \
                    {n for n, m in model.named_modules() if type(m).__name__ in names}
            count = {"n": 0}
            hooks = [m.register_forward_pre_hook(lambda *a: count.__setitem__("n", count["n"] + 1))
                     for m in model.modules() if type(m).__name__ in names]
            self.loss(model, inputs).backward()
            for h in hooks:
                h.remove()
            runs.append(count["n"])
            grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        # Blocks ran again in backward (each one whose output autograd needs: not a frozen block before the first
        # trained layer).
        assert runs[1] > runs[0] > 0
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


class FrozenEncoderContract(ModelContract):
    def test_contract_every_parameter_is_frozen(self):
        model = self.make_model()
        params = list(model.parameters())
        assert params and not any(p.requires_grad for p in params)

    def test_contract_encoding_records_no_graph(self):
        model = self.make_model()
        out = self.forward(model, self.make_inputs())
        assert not out.requires_grad and out.grad_fn is None
