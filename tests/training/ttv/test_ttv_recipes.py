"""Every shipped recipe of ``loom train ttv`` loads and round-trips, and the 14B recipes shard the model through the
same launcher as the 1.3B one: ZeRO-3 (with offload in ``wan14b-offload``), the DiT blocks as ZeRO-3 leaves. Their
memory per GPU is benchmarks/memory_14b.py's (tests/test_gpu_check.py runs it)."""

import dataclasses

import pytest
import yaml

from loom.models.ttv_dit import TTVDiT
from loom.platform import config as cfgmod
from loom.training import launch, ttv


@pytest.mark.parametrize("name", sorted(cfgmod.recipes(ttv.TrainTTVJob)))
def test_every_shipped_recipe_loads_and_round_trips(name):
    cfg = cfgmod.resolve(ttv.TrainTTVJob, name)
    assert isinstance(cfg, ttv.TrainTTVJob)
    assert cfgmod.from_dict(ttv.TrainTTVJob, cfgmod.to_dict(cfg)) == cfg
    # what the run folder's config.yaml holds and `loom generate` / --resume read back
    assert cfgmod.from_dict(ttv.TrainTTVJob, yaml.safe_load(cfgmod.dump_yaml(cfg))) == cfg


def test_wan14b_recipes_differ_from_the_default_by_release_and_sharding_only():
    base, w, off = (cfgmod.resolve(ttv.TrainTTVJob, n) for n in ("default", "wan14b", "wan14b-offload"))
    assert (w.trainer.strategy, w.trainer.zero_stage, w.trainer.offload, w.trainer.devices) == ("deepspeed", 3, False,
                                                                                                8)
    assert w.trainer.precision == "bf16-mixed" and w.trainer.gradient_checkpointing and w.model.lora_rank == 128
    assert dataclasses.replace(w.trainer, zero_stage=2, devices=1) == base.trainer
    assert (w.model.transformer, w.model.vae) == (ttv.config.WAN_FUN_14B,) * 2  # the 14B release as published
    assert dataclasses.replace(w.model, transformer=base.model.transformer, vae=base.model.vae) == base.model
    assert dataclasses.replace(w, trainer=base.trainer, model=base.model) == base
    assert off.trainer.offload and dataclasses.replace(off.trainer, offload=False) == w.trainer


def test_wan14b_strategy_is_zero3_with_offload_only_where_asked():
    pytest.importorskip("deepspeed")
    pytest.importorskip("lightning")
    zero = {n: launch.make_strategy(cfgmod.resolve(ttv.TrainTTVJob, n).trainer, on_gpu=True).config
            for n in ("wan14b", "wan14b-offload")}
    assert zero["wan14b"]["zero_optimization"]["stage"] == 3 and zero["wan14b"]["bf16"] == {"enabled": True}
    assert "offload_param" not in zero["wan14b"]["zero_optimization"]
    assert "offload_optimizer" not in zero["wan14b"]["zero_optimization"]
    z = zero["wan14b-offload"]["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"]["device"] == z["offload_optimizer"]["device"] == "cpu"


def test_wan14b_gathers_whole_blocks():
    pytest.importorskip("deepspeed")
    dit = TTVDiT.tiny()
    applied = launch.apply_sharding_intent(dit, cfgmod.resolve(ttv.TrainTTVJob, "wan14b").trainer)
    assert applied == {"TTVDiT": ["WanTransformerBlock"]}
    assert all(getattr(b, "_z3_leaf", False) for b in dit.transformer.blocks)
