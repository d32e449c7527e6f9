"""The install commands the README and the docs give work as written: an editable install of this package
builds against the installed PyTorch, so every ``pip install -e`` of it says ``--no-build-isolation`` (without
it pip builds in a fresh environment with another PyTorch and rebuilds the CUDA extension, minutes more)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def install_commands(text: str) -> list[str]:
    """Each ``pip install ... -e TARGET ...`` command (up to a ``&&``, a backtick or the line's end)."""
    return [m.group(0) for m in re.finditer(r"pip install[^`\n&]*?(?:-e|--editable)\s+[^\s`&][^`\n&]*", text)]


def test_every_editable_install_builds_against_the_installed_torch():
    found = [(page.name, command) for page in PAGES for command in install_commands(page.read_text())]
    assert found, "no `pip install -e` in the README or the docs"
    bad = [(page, command) for page, command in found if "--no-build-isolation" not in command]
    assert not bad, f"without --no-build-isolation: {bad}"


def test_the_rule_catches_a_command_without_the_flag():
    assert install_commands('`pip install -e ".[docs]" && mkdocs serve`') == ['pip install -e ".[docs]" ']
