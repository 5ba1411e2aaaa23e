"""``loom generate ttv`` without Lightning (`loom.inference.ttv`): a run folder as ``loom train ttv`` leaves it
(config.yaml + lora/) with trained (here: random) LoRA and fusion weights, loaded from safetensors and sampled
exactly as the training module would sample it."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from loom.inference import ttv as inference
from loom.models.ttv import build_dit, sample_latents
from loom.platform import config as cfgmod
from loom.training.ttv import TrainTTVJob
from tests.training.corpus import make_ttv_corpus

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def make_run(root, data: str, **sets) -> tuple[str, dict]:
    """A run folder with the tiny recipe's config and LoRA + fusion weights that differ from a fresh model's
    (LoRA B starts at 0, which would hide a LoRA that failed to load). Returns (run, the saved weights)."""
    run = os.path.join(str(root), "run")
    cfg = cfgmod.resolve(TrainTTVJob, "tiny", [("out", run), ("data.source", data), *sets.items()])
    os.makedirs(run)
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(cfgmod.dump_yaml(cfg))
    dit = build_dit(cfg.model, cfg.trainer.seed)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if p.requires_grad:  # LoRA A/B and the fusion module: what training changes
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    dit.save_lora(os.path.join(run, "lora"))
    return run, {k: v.clone() for k, v in dit.trainable_state_dict().items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ttv") / "ttv")
    make_ttv_corpus(out, samples=2, frames=5, size=32)
    return out


def test_load_run_restores_the_trained_weights_and_settings(corpus, tmp_path):
    run, saved = make_run(tmp_path, corpus, **{"flow.sample_steps": 3, "data.text_len": 16})
    model = inference.load_run(run)
    got = model.dit.trainable_state_dict()
    assert set(got) == set(saved)
    for k, v in saved.items():
        assert torch.equal(got[k], v), k
    assert (model.frames, model.size, model.sample_steps, model.shift) == (5, 32, 3, 5.0)
    assert model.conditioner.text_len == 16 and not model.dit.training
    assert inference.load_run(run, steps=1).sample_steps == 1


def test_generation_matches_the_training_modules_sampler(corpus, tmp_path):
    """What inference generates is what the Lightning module of the same run would: same conditions (nothing
    known), same latents."""
    pytest.importorskip("lightning")
    from loom.models import ttv as ttv_models
    from loom.training.ttv.module import TTVModule

    run, _ = make_run(tmp_path, corpus)
    model = inference.load_run(run)
    batch = inference.read_condition(corpus, "sphere001", model.transform())
    assert batch["rgb"].shape == (1, 5, 32, 32, 3) and batch["__key__"] == ["sphere001"]
    cond = model.condition(batch)

    cfg = cfgmod.load_yaml(TrainTTVJob, os.path.join(run, "config.yaml"))
    cfg = cfgmod.override(cfg, "data.known_prob", 0.0)
    cfg = dataclasses.replace(cfg, cond=ttv_models.NO_DROPS)  # frame 0 as the reference, nothing dropped
    module = TTVModule(cfg)
    module.dit.load_lora(os.path.join(run, "lora"))
    module.dit.eval()
    want = module.condition(batch, [torch.Generator().manual_seed(0)])
    assert set(cond) == set(want)
    for k in want:
        assert torch.equal(cond[k], want[k]), k
    z = model.generate(cond, seed=3)
    assert torch.equal(z, sample_latents(module.dit, want, cfg.flow.sample_steps, cfg.flow.shift, seed=3))


def test_generate_ttv_needs_neither_lightning_nor_training_and_is_a_function_of_the_seed(corpus, tmp_path):
    from loom.datasets.codecs import decode_video

    run, _ = make_run(tmp_path, corpus)
    # Importing Lightning, DeepSpeed or any of loom.training fails in this process.
    code = ("import sys\n"
            "for m in ('lightning', 'pytorch_lightning', 'deepspeed', 'loom.training'):\n"
            "    sys.modules[m] = None\n"
            "from loom.inference.ttv import generate_ttv\n"
            "for seed, out in zip(sys.argv[3::2], sys.argv[4::2]):\n"
            "    generate_ttv(sys.argv[1], sys.argv[2], out, key='sphere000', seed=int(seed))\n")
    outs = [str(tmp_path / f"v{i}.mp4") for i in range(3)]
    argv = [run, corpus] + [a for seed, out in zip((0, 0, 1), outs) for a in (str(seed), out)]
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    videos = [decode_video(open(o, "rb").read()) for o in outs]
    assert videos[0].shape == (5, 32, 32, 3)
    assert open(outs[0], "rb").read() == open(outs[1], "rb").read()
    assert not np.array_equal(videos[0], videos[2])


def test_refuses_what_is_not_a_finished_run_naming_the_path(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml does not exist"):
        inference.load_run(str(tmp_path))
    run, _ = make_run(tmp_path, corpus)
    with open(os.path.join(run, "config.yaml")) as f:
        text = f.read()
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(text.replace("  sample_steps:", "  steps:"))
    with pytest.raises(ValueError, match="has no flow.sample_steps"):
        inference.load_run(run)
    with pytest.raises(KeyError, match="no sample 'nope'"):
        inference.read_condition(corpus, "nope")


def test_a_prompt_needs_the_runs_text_encoder(corpus, tmp_path):
    run, _ = make_run(tmp_path, corpus)
    with pytest.raises(ValueError, match="--prompt needs a text encoder"):
        inference.generate_ttv(run, corpus, str(tmp_path / "x.mp4"), prompt="a red ball")


def test_the_runs_view_of_a_sample_is_trainings_frame_transform():
    from loom.datasets.transforms import frame_transform

    assert frame_transform(0, 0) is None
    t = np.arange(9, dtype=np.uint8)[:, None, None, None]
    sample = {"rgb": np.broadcast_to(t, (9, 32, 48, 3)).copy(), "K": np.tile(np.eye(3), (9, 1, 1)),
              "meta": {}, "__key__": "k"}
    out = frame_transform(5, 16)(sample, np.random.default_rng(0))
    assert out["rgb"].shape == (5, 16, 16, 3) and out["rgb"][:, 0, 0, 0].tolist() == [0, 2, 4, 6, 8]
    assert out["K"][0, 0, 0] == pytest.approx(0.5)  # a centred 32 x 32 box of 48 x 32, halved
