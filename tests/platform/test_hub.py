"""Model names that are Hugging Face repo ids, found in a local cache laid out as huggingface_hub writes it (checked
with huggingface_hub's own ``scan_cache_dir``); local paths win; a miss says where it looked and what to do."""

import os

import pytest

from loom.platform import hub
from tests.platform.hf_cache import cache_repo

pytest.importorskip("huggingface_hub")

REPO = "alibaba-pai/Wan2.1-Fun-V1.1-1.3B-Control"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache named by $HF_HUB_CACHE, the other cache settings cleared."""
    for env in ("HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(env, raising=False)
    root = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.chdir(tmp_path)
    return root


def test_a_repo_name_parses_into_id_revision_and_path():
    assert hub.parse_hub_name(REPO) == hub.HubName(REPO)
    assert hub.parse_hub_name(f"hf://{REPO}@v1.1/transformer/") == hub.HubName(REPO, "v1.1", "transformer")
    assert hub.parse_hub_name("org/name@refs%2Fpr%2F3/Wan2.1_VAE.pth") == hub.HubName("org/name", "refs/pr/3",
                                                                                       "Wan2.1_VAE.pth")
    for not_a_repo in ("", "tiny", "/abs/path", "./rel/path", "~/x/y", "s3://bucket/key", "a/../b", "org/na me",
                       "org//name"):
        assert hub.parse_hub_name(not_a_repo) is None, not_a_repo
    assert str(hub.HubName(REPO, "abc", "vae")) == f"{REPO}@abc/vae"


def test_cache_dir_follows_the_environment_at_call_time(monkeypatch, tmp_path):
    for env in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(env, raising=False)
    assert hub.hub_cache_dir() == (hub.Path("~/.cache/huggingface/hub").expanduser(), "default")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.hub_cache_dir()[0] == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.hub_cache_dir() == (tmp_path / "home" / "hub", "$HF_HOME/hub")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub.hub_cache_dir()[0] == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert hub.hub_cache_dir() == (tmp_path / "new", "$HF_HUB_CACHE")


def test_resolves_a_cached_repo_its_revisions_and_paths_inside(cache):
    from huggingface_hub import scan_cache_dir

    main = cache_repo(cache, REPO, {"config.json": b"{}", "Wan2.1_VAE.pth": b"vae", "transformer/config.json": b"{}"})
    v1 = cache_repo(cache, REPO, {"config.json": b'{"v": 1}'}, revision="v1.0")
    info = scan_cache_dir(cache)
    assert not info.warnings and [r.repo_id for r in info.repos] == [REPO]  # huggingface_hub reads our layout
    assert {ref for r in info.repos for rev in r.revisions for ref in rev.refs} == {"main", "v1.0"}

    assert hub.resolve_model_path(REPO, "model.transformer") == str(main)
    assert hub.resolve_model_path(f"{REPO}/transformer", "model.transformer") == str(main / "transformer")
    assert hub.resolve_model_path(f"hf://{REPO}/Wan2.1_VAE.pth", "model.vae") == str(main / "Wan2.1_VAE.pth")
    assert hub.resolve_model_path(f"{REPO}@v1.0", "model.transformer") == str(v1)
    assert hub.resolve_model_path(f"{REPO}@{main.name}", "model.transformer") == str(main)  # a commit hash
    assert open(hub.resolve_model_path(f"{REPO}/Wan2.1_VAE.pth", "model.vae"), "rb").read() == b"vae"
    # what a model card says the folder came from
    assert hub.hub_origin(main / "transformer") == hub.HubName(REPO, main.name, "transformer")
    assert hub.model_source(str(main)) == hub.HubName(REPO, main.name, "")
    assert hub.model_source(f"{REPO}@v1.0") == hub.HubName(REPO, "v1.0", "")


def test_a_local_path_wins_over_the_cache(cache, tmp_path):
    cache_repo(cache, "org/model", {"config.json": b"{}"})
    local = tmp_path / "org" / "model"  # the same name, as a folder under the working directory
    local.mkdir(parents=True)
    assert hub.resolve_model_path("org/model", "model.vae") == "org/model"
    assert hub.model_source("org/model") is None  # a plain folder: no repo to name
    assert hub.resolve_model_path(str(local), "model.vae") == str(local)


def test_a_miss_says_where_it_looked_and_how_to_get_it(cache):
    with pytest.raises(FileNotFoundError) as e:
        hub.resolve_model_path(REPO, "model.transformer")
    msg = str(e.value)
    assert f"model.transformer={REPO!r}" in msg and str(cache) in msg and "$HF_HUB_CACHE" in msg
    assert f"`hf download {REPO}`" in msg and "models--alibaba-pai--Wan2.1-Fun-V1.1-1.3B-Control" in msg
    assert "--local-dir" in msg and "no models--" in msg

    cache_repo(cache, REPO, {"config.json": b"{}"})
    with pytest.raises(FileNotFoundError, match=r"revision 'v9'.*refs \['main'\]"):
        hub.resolve_model_path(f"{REPO}@v9", "model.transformer")
    with pytest.raises(FileNotFoundError, match=r"has no 'vae/Wan2.1_VAE.pth'.*hf download .* vae/Wan2.1_VAE.pth"):
        hub.resolve_model_path(f"{REPO}/vae/Wan2.1_VAE.pth", "model.vae")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face repo id"):
        hub.resolve_model_path("./missing/folder", "model.vae")
    with pytest.raises(FileNotFoundError, match="model.vae is empty"):
        hub.resolve_model_path("", "model.vae")


def test_a_partial_snapshot_is_used_for_the_part_that_is_there(cache, caplog):
    """`hf download --include ...` leaves a snapshot whose cached tree listing (huggingface_hub >= 2.4) names more
    files than it holds: huggingface_hub calls it incomplete; the part asked for is what counts."""
    tree_cache = pytest.importorskip("huggingface_hub._tree_cache")

    snap = cache_repo(cache, "org/big", {"config.json": b"{}", "transformer/config.json": b"{}"})
    listing = {p: tree_cache.TreeCacheEntry(size=2, blob_id="0" * 40)
               for p in ("config.json", "transformer/config.json", "huge.pth")}
    tree_cache.write_tree_cache(str(cache / "models--org--big"), snap.name, listing)
    with caplog.at_level("WARNING", logger="loom.platform.hub"):
        assert hub.resolve_model_path("org/big/transformer", "model.transformer") == str(snap / "transformer")
        assert not caplog.records  # the part asked for is complete
        assert hub.resolve_model_path("org/big", "model.transformer") == str(snap)
    assert "incomplete" in caplog.text and "huge.pth" in caplog.text


def test_absolute_model_name_keeps_repo_ids_and_absolutises_paths(cache, tmp_path):
    assert hub.absolute_model_name(REPO) == REPO  # not a folder here: a repo name
    (tmp_path / "local" / "vae").mkdir(parents=True)
    assert hub.absolute_model_name("local/vae") == str(tmp_path / "local" / "vae")
    assert hub.absolute_model_name("./nothing") == str(tmp_path / "nothing")
    assert hub.absolute_model_name("s3://b/k") == "s3://b/k" and hub.absolute_model_name("") == ""
    assert os.path.isabs(hub.absolute_model_name("~/x"))
