"""Config machinery: recipes load, overrides are typed, errors name the field."""

import pytest

from loom.platform import config as c
from loom.corpora.ttv import RenderTTVJob


@pytest.mark.parametrize("name", sorted(c.recipes(RenderTTVJob)))
def test_every_shipped_recipe_loads_and_round_trips(name):
    cfg = c.resolve(RenderTTVJob, name)
    assert isinstance(cfg, RenderTTVJob)
    assert c.from_dict(RenderTTVJob, c.to_dict(cfg)) == cfg


def test_paper_defaults():
    cfg = c.resolve(RenderTTVJob, "default")
    assert cfg.orbit.frames == 61 and cfg.lighting.variants == 4


def test_overrides_are_typed():
    cfg = c.resolve(RenderTTVJob, "smoke", c.parse_set(["orbit.frames=7", "orbit.radius=[2, 2.5]",
                                                        "render.denoise=false", "limit=3"]))
    assert cfg.orbit.frames == 7 and cfg.orbit.radius == (2.0, 2.5) and cfg.render.denoise is False
    assert cfg.limit == 3


@pytest.mark.parametrize("item,match", [
    ("orbit.frame=3", "orbit.frame"),          # typo in a key
    ("orbit.frames=many", "orbit.frames"),     # wrong type
    ("orbit.frames=0", "orbit.frames"),        # fails validation
    ("orbit.radius=[0.5, 2]", "orbit.radius"),  # camera inside the unit sphere
    ("render.engine=LUXCORE", "LUXCORE"),      # not one of the literals
    ("noequals", "key=value"),
])
def test_bad_overrides_name_the_field(item, match):
    with pytest.raises(c.ConfigError, match=match):
        c.resolve(RenderTTVJob, "default", c.parse_set([item]))


def test_the_order_of_overrides_does_not_matter_for_checks_across_fields():
    """edges.method=hed needs edges.hed_weights: either order of the two --set flags resolves; the last value of a
    key wins; a value no order can satisfy is still refused by name."""
    from loom.corpora.videos import PrepVideosJob

    want = c.resolve(PrepVideosJob, "tiny", [("edges.hed_weights", "/w/hed.pth"), ("edges.method", "hed")])
    assert c.resolve(PrepVideosJob, "tiny", [("edges.method", "hed"), ("edges.hed_weights", "/w/hed.pth")]) == want
    assert c.resolve(PrepVideosJob, "tiny", [("limit", 3), ("limit", 5)]).limit == 5
    with pytest.raises(c.ConfigError, match="edges.hed_weights"):
        c.resolve(PrepVideosJob, "tiny", [("edges.method", "hed"), ("limit", 2)])


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(c.ConfigError, match="smoke"):
        c.resolve(RenderTTVJob, "nope")


def test_config_hash_ignores_output_location_but_not_render_settings():
    a = c.resolve(RenderTTVJob, "smoke")
    b = c.override(a, "out", "/elsewhere")
    d = c.override(a, "render.samples", 8)
    ex = ("out",)
    assert c.config_hash(a, ex) == c.config_hash(b, ex) != c.config_hash(d, ex)


def test_describe_lists_every_leaf_with_help():
    rows = c.describe(RenderTTVJob)
    names = {r[0] for r in rows}
    assert {"orbit.frames", "render.samples", "lighting.hdris", "ray.address"} <= names
    assert all(r[2] for r in rows), [r[0] for r in rows if not r[2]]


# ------------------------------------------------------------------ errors name the dotted field the user typed


@c.config
class _Section:
    devices: int = c.field(1, help="processes")

    def __post_init__(self):
        c.require(self.devices >= 1, "devices", self.devices, "must be >= 1")  # a section knows only its own names


@c.config
class _Outer:
    trainer: _Section = c.field(default_factory=_Section, help="a section")


@c.config
class _Root:
    inner: _Outer = c.field(default_factory=_Outer, help="a section holding a section")
    out: str = c.field("o", help="output")


@pytest.mark.parametrize("make", [
    lambda: c.override(_Root(), "inner.trainer.devices", 0),           # --set
    lambda: c.from_dict(_Root, {"inner": {"trainer": {"devices": 0}}}),  # --config / config.yaml
])
def test_a_sections_bare_field_name_is_qualified_from_the_root(make):
    with pytest.raises(c.ConfigError) as e:
        make()
    assert e.value.field == "inner.trainer.devices"
    assert str(e.value).startswith("inner.trainer.devices=0 is invalid")


def test_a_real_job_names_trainer_devices():
    from loom.training.ttv import TrainTTVJob

    with pytest.raises(c.ConfigError, match=r"^trainer\.devices=0 is invalid") as e:
        c.resolve(TrainTTVJob, "tiny", c.parse_set(["trainer.devices=0"]))
    assert e.value.field == "trainer.devices"


def test_an_already_dotted_name_is_left_as_the_section_wrote_it():
    with pytest.raises(c.ConfigError) as e:
        c.resolve(RenderTTVJob, "default", c.parse_set(["ray.workers=-1"]))
    assert e.value.field == "ray.workers" and "ray.ray" not in str(e.value)


# ------------------------------------------------------------------ did-you-mean and renamed keys


@pytest.mark.parametrize("item,want", [
    ("orbit.framez=3", "'orbit.frames'"),   # a typo in the last part
    ("orbt.frames=3", "'orbit.frames'"),    # a typo in the section
    ("frames=3", "'orbit.frames'"),         # the section left out
    ("render.sample=3", "'render.samples'"),
])
def test_unknown_keys_get_a_did_you_mean(item, want):
    with pytest.raises(c.ConfigError, match="did you mean") as e:
        c.resolve(RenderTTVJob, "default", c.parse_set([item]))
    assert want in str(e.value)


def test_a_close_match_is_not_drowned_in_siblings_of_the_same_section():
    with pytest.raises(c.ConfigError) as e:
        c.resolve(RenderTTVJob, "default", c.parse_set(["orbit.framez=3"]))
    assert str(e.value).count("'orbit.") == 2  # the key typed and one suggestion, not every orbit field


def test_unknown_key_in_a_config_file_gets_a_did_you_mean(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("orbit:\n  framez: 3\n")
    with pytest.raises(c.ConfigError, match=r"orbit\.framez.*did you mean 'orbit\.frames'") as e:
        c.load_yaml(RenderTTVJob, str(path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("old,new", sorted({
    "cluster.workers": "ray.workers", "cluster.address": "ray.address", "parallel.workers": "ray.workers",
    "parallel.gpus_per_worker": "ray.gpus_per_worker", "launch.ray_address": "ray.address",
    "launch.num_workers": "ray.workers", "launch.use_gpu": "ray.gpus_per_worker",
    "launch.cpus_per_worker": "ray.cpus_per_worker", "launch.max_failures": "trainer.max_failures"}.items()))
def test_keys_renamed_by_the_restructure_say_their_new_name(old, new):
    from loom.training.ttv import TrainTTVJob

    assert c.renamed(old) == new
    with pytest.raises(c.ConfigError, match=f"'{old}' was renamed '{new}'"):
        c.resolve(TrainTTVJob, "tiny", c.parse_set([f"{old}=1"]))


def test_an_old_config_file_with_a_launch_section_names_each_rename(tmp_path):
    from loom.training.ttv import TrainTTVJob

    path = tmp_path / "config.yaml"
    path.write_text("launch:\n  ray_address: auto\n  num_workers: 4\n")
    with pytest.raises(c.ConfigError) as e:
        c.load_yaml(TrainTTVJob, str(path))
    assert "'launch.ray_address' was renamed 'ray.address'" in str(e.value)
    assert "'launch.num_workers' was renamed 'ray.workers'" in str(e.value)


def test_a_rename_to_a_section_the_job_lacks_is_not_suggested():
    # a render job has no trainer section: launch.max_failures is just unknown there
    with pytest.raises(c.ConfigError) as e:
        c.resolve(RenderTTVJob, "default", c.parse_set(["launch.max_failures=2"]))
    assert "renamed" not in str(e.value)


def test_diff_names_each_changed_leaf():
    a = c.resolve(RenderTTVJob, "smoke")
    b = c.override(c.override(a, "orbit.frames", 9), "render.samples", 3)
    assert sorted(c.diff(a, b)) == [("orbit.frames", a.orbit.frames, 9), ("render.samples", a.render.samples, 3)]
    assert c.diff(a, a) == []


def test_help_config_shows_the_defaults_each_job_gives_its_sections():
    """One RaySettings class, three defaults: --help-config shows the one the job really starts from."""
    from loom.corpora.ttv import RenderTTVJob
    from loom.eval.bench_ttv import EvalTTVJob
    from loom.training.ttv import TrainTTVJob

    def workers(job_cls):
        (row,) = [d for n, d, _ in c.describe(job_cls) if n == "ray.workers"]
        return row

    assert (workers(RenderTTVJob), workers(EvalTTVJob), workers(TrainTTVJob)) == ("0", "1", "2")
    assert c.resolve(TrainTTVJob).ray.workers == 2
