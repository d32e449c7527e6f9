"""mkdocs hook: the API reference of ``regap_fast``'s top-level names, from the package's own list.

``regap_fast/__init__.py``'s ``_EXPORTS`` (public name -> the module that defines it, the table its
lazy ``__getattr__`` imports from, and ``__all__``'s source) is the one list of the public API.
docs/api.md holds MARKER and gets one mkdocstrings entry per name, grouped by module, so a name that
is added or moves shows up here without editing the page. The table is read from the source (no
import), the same files mkdocstrings documents.
"""

from __future__ import annotations

import ast
from pathlib import Path

PAGE = "api.md"
MARKER = "<!-- api: regap_fast's top-level names, by docs/hooks/api.py -->"
PACKAGE_INIT = Path(__file__).resolve().parents[2] / "regap_fast" / "__init__.py"


def exports() -> dict[str, str]:
    for node in ast.parse(PACKAGE_INIT.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{PACKAGE_INIT} has no `_EXPORTS = {{...}}` table: update docs/hooks/api.py")


def top_level_entries() -> str:
    by_module: dict[str, list[str]] = {}
    for name, module in exports().items():
        by_module.setdefault(f"regap_fast{module}", []).append(name)
    lines = []
    for module, names in by_module.items():
        lines += [f"## `{module}`", ""] + [f"::: {module}.{name}\n" for name in names]
    return "\n".join(lines)


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} lost its marker line (the top-level API goes where it stands): {MARKER}")
    return markdown.replace(MARKER, top_level_entries())
