"""The operator guides (docs/images.md, docs/cluster-kuberay.md, docs/cluster-ray-up.md): the files, targets and
Loom commands they name exist and parse."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.infra.infra_files import DOCKERFILE, ROOT, parse_dockerfile
from tests.infra.test_manifests import loom_print_config

GUIDES = [ROOT / "docs" / name for name in ("images.md", "cluster-kuberay.md", "cluster-ray-up.md")]
PAGES = [*GUIDES, ROOT / "infra" / "README.md", ROOT / "infra" / "schemas" / "README.md"]


def operators_section() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## For cluster operators\n(.*?)^## ", readme, re.S | re.M)
    assert match, "README.md has no '## For cluster operators' section before the next section"
    return match.group(1)


def shell_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks, continuation lines joined, heredoc bodies dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        block = re.sub(r"<<\s*'?(\w+)'?\n.*?\n\1\n", "\n", block, flags=re.S)
        out += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return out


def words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def test_guides_exist_and_the_readme_links_them():
    section = operators_section()
    for guide in GUIDES:
        assert guide.exists(), guide
        assert f"]({guide.relative_to(ROOT)})" in section, f"README's operators section does not link {guide.name}"
    assert "](infra/README.md)" in section


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_named_in_the_guides_exist(page):
    text = page.read_text()
    named = set(re.findall(r"(?<![\w/.])((?:infra|docs|tests)/[\w./-]*\w)", text))
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in link:
            named.add(str((page.parent / link).resolve().relative_to(ROOT)))
    assert named, f"{page} names no file"
    for path in named:
        assert (ROOT / path).exists(), f"{page.relative_to(ROOT)} names {path}, which does not exist"


def test_commands_name_existing_files_and_targets():
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    commands = [c for page in GUIDES for c in shell_commands(page.read_text())]
    commands += shell_commands(operators_section())
    checked = 0
    for command in commands:
        argv = words(command)
        for flag in ("-f", "--target"):
            for i, w in enumerate(argv[:-1]):
                if w != flag or argv[i + 1] == "-":
                    continue
                value = argv[i + 1]
                if flag == "--target":
                    assert value in stages, f"{command}: no Dockerfile target {value}"
                elif "/" in value or value.endswith(".yaml"):  # `-f FILE`, not `logs -f POD`
                    assert (ROOT / value).exists() or value.startswith(("job/", "deploy/")), f"{command}: {value}"
                else:
                    continue
                checked += 1
        if argv[:1] == ["ray"] and len(argv) > 1 and argv[1] in ("up", "down", "exec", "attach", "monitor",
                                                                  "dashboard"):
            config = next(w for w in argv[2:] if w.endswith(".yaml"))
            assert (ROOT / config).exists(), f"{command}: {config}"
            checked += 1
    assert checked >= 15


def test_loom_commands_in_the_guides_are_valid():
    """Every `loom render|train ...` the guides show (after `ray job submit --`, say) parses with --print-config."""
    found = 0
    for page in GUIDES:
        for command in shell_commands(page.read_text()):
            argv = words(command)
            if "loom" not in argv:
                continue
            start = argv.index("loom")
            if argv[start + 1:start + 2] not in (["render"], ["train"]):
                continue
            loom_argv = [a for a in argv[start + 1:] if a != "--no-progress"]
            rc, output = loom_print_config(loom_argv)
            assert rc == 0, f"{page.name}: {command}\n{output[-400:]}"
            found += 1
    assert found >= 4
