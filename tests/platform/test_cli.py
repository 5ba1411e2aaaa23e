"""The `loom` command: clear errors for bad input (exit 2, the offending value named), config printing, dry runs,
verification exit codes."""

import subprocess
import sys

import pytest

from loom.platform import shards, storage


def loom(*args, check=False):
    p = subprocess.run([sys.executable, "-m", "loom.cli", *args], capture_output=True, text=True,
                       timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.mark.parametrize("args,needle", [
    (["--assets", "/no/such/folder"], "/no/such/folder"),
    (["--set", "orbit.frames=abc"], "orbit.frames"),
    (["--set", "orbit.framez=3"], "orbit.framez"),
    (["--recipe", "nope"], "smoke"),
    (["--assets", "objaverse:colour=red"], "colour"),
])
def test_bad_input_is_one_clear_line(args, needle, tmp_path):
    p = loom("render", "ttv", "--out", str(tmp_path / "o"), *args)
    assert p.returncode == 2
    assert needle in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()  # nothing written


def test_print_and_help_config():
    p = loom("render", "ttv", "--recipe", "smoke", "--set", "orbit.frames=9", "--print-config", check=True)
    assert "frames: 9" in p.stdout
    p = loom("render", "ttv", "--help-config", check=True)
    assert "orbit.frames" in p.stdout and "lighting.hdris" in p.stdout


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "o"
    p = loom("render", "ttv", "--recipe", "smoke", "--set", "render.backend=fake", "--set", "lighting.variants=3",
             "--out", str(out), "--dry-run", check=True)
    assert "15 samples" in p.stdout and "60 frames" in p.stdout  # 5 bundled assets x 3 variants x 4 frames
    assert "core-hours" in p.stdout and "GB" in p.stdout
    assert not out.exists()
    # a corpus priced from the assets at hand: 30,000 assets x 3 variants x 4 frames, at the config's prices
    p = loom("render", "ttv", "--recipe", "smoke", "--set", "render.backend=fake", "--set", "lighting.variants=3",
             "--set", "price.cpu_core_hour=1000", "--out", str(out), "--dry-run", "--assets-total", "30000",
             check=True)
    assert "90000 samples" in p.stdout and "360000 frames" in p.stdout and "a corpus of 30000 assets" in p.stdout
    assert "1000/core-hour" in p.stdout and "USD" in p.stdout
    assert "--assets-total" in loom("render", "ttv", "--assets-total", "0").stderr and not out.exists()


def test_assets_list_bundled_and_manifest(tmp_path):
    p = loom("assets", "list", "bundled", "--manifest", str(tmp_path / "m.jsonl"), check=True)
    assert "bunny" in p.stdout and "CC0-1.0" in p.stdout
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 5


def test_verify_exit_codes(tmp_path):
    out = str(tmp_path / "o")
    name = shards.shard_name("ttv", 0)
    size, sha, keys = shards.write_tar(shards.shard_url(out, name), [("a", {"x.txt": b"1" * 2000})])
    shards.write_sidecar(out, shards.ShardRecord(name=name, samples=1, size=size, sha256=sha, keys=keys))
    shards.write_manifest(out, [name])
    assert loom("shards", "verify", out).returncode == 0
    storage.write_bytes(shards.shard_url(out, name), storage.read_bytes(shards.shard_url(out, name))[:1024])
    p = loom("shards", "verify", out)
    assert p.returncode == 1 and name in p.stdout


def test_unknown_environment_map_is_refused_before_any_work(tmp_path):
    pytest.importorskip("bpy")  # the bundled maps are found in bpy's data files (loom.corpora.base.check_hdris)
    p = loom("render", "ttv", "--out", str(tmp_path / "o"), "--set", "lighting.hdris=[studio, nowhere]")
    assert p.returncode == 2 and "nowhere" in p.stderr and "studio" in p.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ the edges every command shares (in process)

from loom import cli  # noqa: E402
from loom.platform import config as cfgmod  # noqa: E402

JOB_COMMANDS = {("render", "ttv"), ("render", "4d"), ("render", "scene"), ("cache", "latents"), ("cache", "4d"),
                ("cache", "ggi"), ("train", "ttv"), ("train", "vae"), ("train", "shape4d"), ("train", "ggi"),
                ("train", "style"), ("eval", "ttv"), ("eval", "texture"), ("eval", "4d"), ("eval", "scene"),
                ("prep", "videos")}


def job_parsers():
    """{(group, command): parser} of every command that runs a job config."""
    root = cli.build_parser()
    return {tuple(q.prog.split()[1:]): q for q in cli.parsers(root) if q.get_default("job_class")}


def test_every_job_command_takes_the_job_arguments():
    found = job_parsers()
    assert set(found) == JOB_COMMANDS
    for q in found.values():
        flags = {s for a in q._actions for s in a.option_strings}
        assert {"--config", "--recipe", "--set", "--print-config", "--help-config", "-v"} <= flags, q.prog


@pytest.mark.parametrize("command", sorted(JOB_COMMANDS))
def test_the_set_example_in_help_resolves_for_its_command(command):
    q = job_parsers()[command]
    example = q.get_default("set_example")
    assert f"--set {example}" in " ".join(q.format_help().split())
    job_cls = q.get_default("job_class")
    key, value = cfgmod.parse_set([example])[0]
    cfg = cfgmod.resolve(job_cls, "default", [(key, value)])
    got = cfg
    for part in key.split("."):
        got = getattr(got, part)
    assert got == value


@pytest.mark.parametrize("command", sorted(JOB_COMMANDS))
def test_config_file_round_trip_then_set_on_top(command, tmp_path, capsys):
    q = job_parsers()[command]
    example = q.get_default("set_example")
    assert cli.main([*command, "--set", example, "--set", "out=" + str(tmp_path / "o"), "--print-config"]) == 0
    first = capsys.readouterr().out
    path = tmp_path / "config.yaml"
    path.write_text(first)
    assert cli.main([*command, "--config", str(path), "--print-config"]) == 0
    assert capsys.readouterr().out == first  # the same resolved config
    assert cli.main([*command, "--config", str(path), "--set", "out=elsewhere", "--print-config"]) == 0
    again = cfgmod.from_dict(q.get_default("job_class"), __import__("yaml").safe_load(capsys.readouterr().out))
    assert again.out == "elsewhere"  # --set goes on top of the file


def test_recipe_and_config_together_are_refused(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("limit: 1\n")
    assert cli.main(["render", "ttv", "--recipe", "smoke", "--config", str(path), "--print-config"]) == 2
    assert "not both" in capsys.readouterr().err


def test_the_config_yaml_a_render_job_writes_replays_it(tmp_path, capsys):
    from loom.corpora.assets import resolve_source
    from loom.corpora.base import job_spec
    from loom.corpora.ttv import RenderTTVJob
    from loom.platform.jobs import run_job

    out = str(tmp_path / "o")
    cfg = cfgmod.resolve(RenderTTVJob, "smoke", [("out", out), ("orbit.frames", 5), ("render.backend", "fake")])
    run_job(job_spec(cfg, resolve_source("bundled")), progress=False, max_shards=0)  # config.yaml only, no render
    assert cli.main(["render", "ttv", "--config", f"{out}/config.yaml", "--print-config"]) == 0
    replayed = cfgmod.from_dict(RenderTTVJob, __import__("yaml").safe_load(capsys.readouterr().out))
    assert replayed == cfg


@pytest.mark.parametrize("group", ["render", "cache", "assets", "shards", "train", "generate", "eval"])
def test_a_group_alone_lists_its_commands(group, capsys):
    root = cli.build_parser()
    parser = next(q for q in cli.parsers(root) if q.prog == f"loom {group}")
    names = [n for a in parser._actions if isinstance(a.choices, dict) for n in a.choices]
    assert names
    assert cli.main([group]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"usage: loom {group}") and all(n in out for n in names)


@pytest.mark.parametrize("argv,needle", [
    (["render", "ttv", "--outt", "x"], "did you mean --out?"),
    (["train", "ttv", "--sett", "a=1"], "did you mean --set?"),
    (["trian"], "did you mean 'train'?"),
    (["train", "ttvv"], "did you mean 'ttv'?"),
])
def test_unknown_flags_and_commands_get_a_did_you_mean(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    if argv[0] != "trian":
        assert f"usage: loom {argv[0]}" in err  # the command's own usage, not the root's


@pytest.mark.parametrize("argv", [
    ["-v", "render", "ttv", "--set", "orbit.frames=0", "--print-config"],
    ["render", "ttv", "--set", "orbit.frames=0", "--print-config", "--debug"],
])
def test_verbose_shows_the_traceback_of_an_error(argv, capsys, monkeypatch):
    monkeypatch.delenv("LOOM_DEBUG", raising=False)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "orbit.frames=0 is invalid" in err.splitlines()[-1]
    assert cli.main([a for a in argv if a not in ("-v", "--debug")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def _interrupt(*_, **__):
    raise KeyboardInterrupt


@pytest.mark.parametrize("argv,patch,kept", [
    (["render", "ttv", "--recipe", "smoke", "--set", "render.backend=fake"], ("loom.platform.jobs", "run_job"),
     "finished shards in {out}/shards are kept: the same command renders only the rest"),
    (["train", "ttv", "--recipe", "tiny"], ("loom.training.ttv", "train"),
     "the last checkpoint in {out}/checkpoints is kept"),
    (["eval", "ttv", "--recipe", "tiny"], ("loom.eval.bench_ttv", "evaluate"),
     "{out}/pred are kept: the same command with the same --out reuses them"),
    (["cache", "latents"], ("loom.corpora.latents", "job_spec"),
     "finished latent shards in {out}/shards are kept"),
])
def test_ctrl_c_says_what_that_job_kind_keeps(argv, patch, kept, tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.setattr(importlib.import_module(patch[0]), patch[1], _interrupt)
    out = str(tmp_path / "o")
    assert cli.main([*argv, "--out", out]) == 130
    assert kept.format(out=out) in capsys.readouterr().err
