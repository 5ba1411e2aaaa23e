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
