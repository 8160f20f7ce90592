"""mkdocs hook: the API pages must document exactly ``gaussnewton.__all__``.

``docs/api/*.md`` pages render one ``::: gaussnewton.<name>`` per public name, or
``::: gaussnewton.<module>.<name>`` for a function that shares its module's name (there
``gaussnewton.<name>`` resolves to the module); a ``::: gaussnewton`` block with a ``members:`` list
is read too; ``::: gaussnewton.<module>`` (a module's docstring, e.g. its math) is allowed. Before the build this hook compares those names with ``__all__`` (read from
``src/gaussnewton/__init__.py`` by ``ast``: no jax import); after it, it checks that every public
name really got a heading (mkdocstrings skips a member it cannot resolve without a warning).
Either mismatch fails the build.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

_MEMBER = re.compile(r"^\s+- ([A-Za-z_]\w*)\s*$")
_DIRECTIVE = re.compile(r"^::: gaussnewton\.(?:\w+\.)?(\w+)\s*$")
_PUBLIC: set[str] = set()


def _public_names(init: Path) -> set[str]:
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    raise PluginError(f"{init}: no __all__ found")


def _documented(api_dir: Path) -> dict[str, str]:
    names: dict[str, str] = {}
    for page in sorted(api_dir.glob("*.md")):
        in_members = False
        for line in page.read_text().splitlines():
            if line.strip() == "members:":
                in_members = True
                continue
            d = _DIRECTIVE.match(line)
            if d:
                names[d.group(1)] = page.name
            m = _MEMBER.match(line) if in_members else None
            if m:
                names[m.group(1)] = page.name
            else:
                in_members = False
    return names


def on_config(config, **kwargs):
    root = Path(config["config_file_path"]).parent
    public = _public_names(root / "src" / "gaussnewton" / "__init__.py")
    documented = _documented(Path(config["docs_dir"]) / "api")
    pkg = root / "src" / "gaussnewton"
    for name in list(documented):  # a module overview (``::: gaussnewton.preconditioner``)
        if name not in public and ((pkg / f"{name}.py").exists() or (pkg / name).is_dir()):
            del documented[name]
    missing = sorted(public - documented.keys())
    extra = sorted(documented.keys() - public)
    if missing or extra:
        raise PluginError(
            f"API pages out of sync with gaussnewton.__all__: missing {missing} (add a "
            "'::: gaussnewton.<name>' block for each to a docs/api/*.md page), not public "
            f"{extra} (remove them or export them)."
        )
    _PUBLIC.clear()
    _PUBLIC.update(public)
    return config


def on_post_build(config, **kwargs):
    html = "".join(p.read_text() for p in (Path(config["site_dir"]) / "api").rglob("*.html"))
    ids = set(re.findall(r'id="gaussnewton\.(?:\w+\.)?(\w+)"', html))
    missing = sorted(_PUBLIC - ids)
    if missing:
        raise PluginError(
            f"API pages list {missing} but mkdocstrings rendered no heading for them: a name that "
            "shadows a submodule must be written as '::: gaussnewton.<module>.<name>'."
        )
