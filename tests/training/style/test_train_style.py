"""``loom train style`` on tiny random FLUX parts: the recipes, the references and their resumable batches, a real
Lightning run through the CLI (MLflow run; the LoRA files load in plain diffusers and change the networks; the
trained LoRA lowers the loss on its reference; `load_style_run` samples differently from the base), resume after a
kill gives the uninterrupted losses, and bad references are refused by name."""

import os

import numpy as np
import pytest

from loom.inference.style import load_style_run
from loom.platform import config as cfgmod
from loom.training import style
from loom.training.style.config import TrainStyleJob
from loom.training.style.data import StyleBatches, load_references
from tests.training import runs as runs_mod

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def write_image(path, w=96, h=80, invert=False):
    from PIL import Image

    y, x = np.mgrid[:h, :w]
    a = np.stack([(x * 2) % 256, (y * 3) % 256, ((x + y) * 5) % 256], -1).astype(np.uint8)
    a[h // 4:h // 2, w // 3:2 * w // 3] = 255
    Image.fromarray(255 - a if invert else a).save(path)
    return str(path)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    d = tmp_path_factory.mktemp("refs")
    return [write_image(d / "house.png"), write_image(d / "street.png", 64, 96, invert=True)]


def loom_style(out, refs, *sets, env=None, resume=False, identifiers=("[v1] style", "[v2] style")):
    """`loom train style --recipe tiny --reference ... --identifier ...` as a user runs it (runs_mod's settings),
    started: returns the process."""
    import subprocess

    cmd = [runs_mod.LOOM, "train", "style", "--recipe", "tiny", "--out", out, "--set", "trainer.progress=false"]
    for r in refs:
        cmd += ["--reference", r]
    for i in identifiers:
        cmd += ["--identifier", i]
    for s in sets:
        cmd += ["--set", s]
    if resume:
        cmd.append("--resume")
    e = {**os.environ, "OMP_NUM_THREADS": "1", "LOOM_HOME": os.path.dirname(out), **(env or {})}
    e.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)


def finish(p, want=0):
    _, err = p.communicate(timeout=600)
    assert p.returncode == want, f"{p.args} ended with {p.returncode}, not {want}:\n{err[-4000:]}"


SETS = ("trainer.max_steps=4", "trainer.checkpoint_every=2", "optim.lr=0.01")


@pytest.fixture(scope="module")
def trained(refs, tmp_path_factory):
    """(the uninterrupted run, the same run killed at step 3 and resumed): the first two at once (the runs are
    single-threaded, mostly importing), each with its own MLflow store."""
    full, killed = (str(tmp_path_factory.mktemp(n) / n) for n in ("full", "killed"))
    a = loom_style(full, refs, *SETS)
    b = loom_style(killed, refs, *SETS, env={"LOOM_FAIL_AT_STEP": "3"})
    finish(a)
    finish(b, 17)
    finish(loom_style(killed, refs, *SETS, resume=True))
    return full, killed


@pytest.fixture(scope="module")
def full_run(trained):
    return trained[0]


# ------------------------------------------------------------------------------------------------------ fast


def test_recipes_resolve_and_differ_where_paper_and_code_do():
    for name in cfgmod.recipes(TrainStyleJob):
        cfgmod.resolve(TrainStyleJob, name)
    code, paper = (cfgmod.resolve(TrainStyleJob, n) for n in ("default", "paper"))
    assert code.lora.double_blocks == paper.lora.double_blocks == tuple(range(19))
    assert code.lora.single_blocks == (1, 2, 3, 4) and paper.lora.single_blocks == (0, 1, 2, 3)  # 23 blocks each
    assert code.lora.rank == paper.lora.rank == 16 and code.lora.scale_alpha == 16
    assert (code.trainer.max_steps, code.optim.name, code.optim.weight_decay) == (400, "adamw", 0.01)
    assert (paper.trainer.max_steps, paper.optim.name) == (400, "adam")
    assert code.optim.betas == (0.9, 0.999) and code.optim.eps == 1e-8 and code.trainer.precision == "bf16-mixed"
    with pytest.raises(cfgmod.ConfigError, match="data.size"):
        cfgmod.resolve(TrainStyleJob, "tiny", [("data.size", 100)])
    with pytest.raises(cfgmod.ConfigError, match="data.aspect_ratios"):
        cfgmod.resolve(TrainStyleJob, "tiny", [("data.aspect_ratios", ["3:2"])])


def test_references_are_cropped_once_and_batches_resume_exactly(refs):
    d = cfgmod.resolve(TrainStyleJob, "tiny", [("data.references", refs), ("data.aspect_ratios", ["16:9", "1:1",
                                                                                                 "native"])]).data
    calls = []

    class Counting:
        def __call__(self, image):
            calls.append(image.shape)
            return (image[..., 0] > 128).astype(np.uint8) * 255

    rs = load_references(d, Counting())
    assert len(calls) == 6  # 2 references x 3 crops, once
    assert rs[0].crops["16:9"][0].shape == (32, 64, 3) and rs[0].crops["1:1"][0].shape == (64, 64, 3)
    assert rs[0].crops["native"][0].shape == (48, 64, 3) and rs[1].crops["native"][0].shape == (64, 32, 3)
    assert [r.prompt for r in rs] == ["[v1]", "[v2]"]  # default identifiers, one each

    a = StyleBatches(rs, d.aspect_ratios, 1, seed=3)
    it = iter(a)
    first = [next(it) for _ in range(6)]
    seen = [int(b["reference"][0]) for b in first]
    assert sorted(seen[:2]) == sorted(seen[2:4]) == [0, 1]  # each reference once per epoch
    b = StyleBatches(rs, d.aspect_ratios, 1, seed=3)
    b.load_state_dict({"step": 4})
    again = next(iter(b))
    assert again["__key__"] == first[4]["__key__"]
    np.testing.assert_array_equal(again["image"].numpy(), first[4]["image"].numpy())
    assert len({tuple(x["image"].shape) for x in first}) > 1  # the crop is drawn per step
    other_rank = StyleBatches(rs, d.aspect_ratios, 1, seed=3, rank=1, world=2).batch(0)
    assert other_rank["__key__"] != StyleBatches(rs, d.aspect_ratios, 1, seed=3, rank=0, world=2).batch(0)["__key__"]


def test_bad_references_are_refused_by_name(refs, tmp_path, capsys):
    from loom import cli

    missing = str(tmp_path / "nowhere.png")
    assert cli.main(["train", "style", "--recipe", "tiny", "--reference", missing, "--out", str(tmp_path / "o")]) == 2
    assert missing in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    assert cli.main(["train", "style", "--recipe", "tiny", "--reference", str(broken), "--out",
                     str(tmp_path / "o")]) == 2
    assert str(broken) in capsys.readouterr().err
    assert cli.main(["train", "style", "--recipe", "tiny", *sum((["--reference", r] for r in refs), []),
                     *["--identifier", "[a]", "--identifier", "[b]", "--identifier", "[c]"],
                     "--out", str(tmp_path / "o")]) == 2
    assert "data.identifiers" in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoints").exists()
    with pytest.raises(FileNotFoundError, match="not.*style run|finished `loom train style`"):
        load_style_run(str(tmp_path))


def test_train_on_references_runs_the_commands_config(refs, tmp_path, monkeypatch):
    from loom.training import launch

    got = []
    monkeypatch.setattr(launch, "train_run", lambda cfg, make, resume: got.append((cfg, resume)))
    out = str(tmp_path / "style")
    assert style.train_on_references(out, refs[:1], ["[v]"], recipe="tiny", sets=["trainer.max_steps=2"]) == out
    (cfg, resume), = got
    assert cfg.data.references == (refs[0],) and cfg.data.identifiers == ("[v]",) and cfg.trainer.max_steps == 2
    assert cfg.out == out and resume is False
    with pytest.raises(FileNotFoundError, match="nope.png"):
        style.train_on_references(out, [str(tmp_path / "nope.png")], ["[v]"], recipe="tiny")


# ------------------------------------------------------------------------------------------------------ the CLI


def _fixed_loss(parts, ref_dir, seed=0):
    """sag.loss on the first reference's training crop at fixed t and noise."""
    import json

    import torch
    from PIL import Image

    from loom.models import sag

    entry = json.load(open(os.path.join(ref_dir, "references.json")))[0]
    crop = entry["crops"]["1:1"]
    img = np.asarray(Image.open(os.path.join(ref_dir, crop["image"])))
    edges = np.asarray(Image.open(os.path.join(ref_dir, crop["edges"])))
    x0 = sag.encode(parts.vae, sag.image_input(img))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    tokens, pooled = parts.text.encode([entry["prompt"]])
    with torch.no_grad():
        return [float(sag.loss(parts, x0, sag.image_input(edges), tokens, pooled, torch.tensor([t]), noise))
                for t in (0.3, 0.6, 0.9)]


@pytest.mark.integration
def test_tiny_run_logs_saves_and_its_loras_load_in_plain_diffusers(full_run, tmp_path):
    import torch
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from loom.models import sag

    mlflow = pytest.importorskip("mlflow")
    res, client = runs_mod.runs(full_run)
    (_, hist, run), = res["full"]
    assert [s for s, _ in hist] == [0, 1, 2, 3] and all(np.isfinite(v) for _, v in hist)
    assert "Canny" in run.data.params["edges"] and run.data.params["lora.rank"] == "4"
    arts = {a.path for a in mlflow.MlflowClient(client.tracking_uri).list_artifacts(run.info.run_id)}
    assert {"lora", "samples", "references"} <= arts
    assert sorted(os.listdir(os.path.join(full_run, "samples"))) == ["v1-style.png", "v2-style.png"]
    assert len([f for f in os.listdir(os.path.join(full_run, "references")) if f.endswith("-edges.png")]) == 2

    lora = os.path.join(full_run, "lora")
    sd = load_file(os.path.join(lora, style.TRANSFORMER_LORA))
    assert all(k.startswith("transformer.") for k in sd)
    blocks = {k.split(".")[1] + "." + k.split(".")[2] for k in sd}
    assert blocks == {"transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.1"}
    q, k = (sd[f"transformer.transformer_blocks.0.attn.{n}.lora_A.weight"] for n in ("to_q", "to_k"))
    assert torch.equal(q, k)  # x-flux's fused qkv LoRA: one down matrix

    cfg = cfgmod.load_yaml(TrainStyleJob, os.path.join(full_run, "config.yaml"))
    base = sag.build(cfg.model, cfg.trainer.seed)
    t = base.text
    pipe = FluxPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=t.clip, tokenizer=t.clip_tok,
                        text_encoder_2=t.t5, tokenizer_2=t.t5_tok, transformer=base.transformer)
    z = torch.randn(1, 16, 64)
    ids_img, ids_txt = sag.ids(8, 8, 8, "cpu", torch.float32)
    kw = dict(hidden_states=z, timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]),
              pooled_projections=torch.randn(1, 16), encoder_hidden_states=torch.randn(1, 8, 32), img_ids=ids_img,
              txt_ids=ids_txt, return_dict=False)
    with torch.no_grad():
        before = base.transformer(**kw)[0]
        pipe.load_lora_weights(lora)  # plain diffusers, the file as saved
        after = base.transformer(**kw)[0]
        assert (after - before).abs().max() > 1e-4
        cond = torch.randn(1, 3, 64, 64)
        cn_before = base.controlnet(**{**kw, "controlnet_cond": cond})[0][0]
        base.controlnet.load_lora_adapter(lora, weight_name=style.CONTROLNET_LORA, prefix=None)
        cn_after = base.controlnet(**{**kw, "controlnet_cond": cond})[0][0]
    assert (cn_after - cn_before).abs().max() > 1e-5
    assert base.controlnet.peft_config["default_0"].r == 4


@pytest.mark.integration
def test_load_style_run_samples_in_its_style_and_lowers_the_loss_on_its_reference(full_run):
    import torch

    from loom.models import sag

    run = load_style_run(full_run)
    assert set(run.identifiers) == {"[v1] style", "[v2] style"}
    assert os.path.isfile(run.identifiers["[v1] style"]) and run.identifiers["[v1] style"].startswith(full_run)
    base = sag.build(cfgmod.from_dict(sag.SAGModelSettings, run.config["model"]), run.config["trainer"]["seed"])
    edges = torch.zeros(1, 3, 64, 64) - 1
    edges[..., 20:24, :] = 1

    def draw(parts):
        return sag.sample(parts, "[v1] style", (64, 64), edges=edges, steps=2, true_cfg=1.0,
                          generator=torch.Generator().manual_seed(0))

    assert (draw(run.parts) - draw(base)).abs().max() > 1e-3
    trained, untrained = _fixed_loss(run.parts, os.path.join(full_run, "references")), \
        _fixed_loss(base, os.path.join(full_run, "references"))
    assert sum(trained) < sum(untrained), (trained, untrained)


@pytest.mark.integration
def test_resume_after_a_kill_gives_the_losses_of_an_uninterrupted_run(trained):
    full, killed = trained
    (_, want, _), = runs_mod.runs(full)[0]["full"]
    (_, got, _), = runs_mod.runs(killed)[0]["killed"]
    assert sorted({s for s, _ in got}) == list(range(4)) and len(got) == 5  # step 2 logged before the kill, again after
    want = dict(want)
    for step, loss in got:  # every value, the killed run's and the resumed one's (the history is sorted by value)
        assert loss == pytest.approx(want[step], rel=1e-5, abs=1e-6), (step, got, want)
