"""A griffe extension for the API docs: RST bits of our docstrings rendered as Markdown.

The library's docstrings are Google style with some RST: ``.. math::`` blocks, ``:math:`x```,
``:func:`x```/``:class:`x```/... roles. mkdocstrings renders docstrings as Markdown, so before
parsing this rewrites

* ``.. math:: a`` plus its indented continuation lines -> a ``$$ ... $$`` block (arithmatex),
* ``:math:`a``` -> ``$a$``,
* ``:func:`~pkg.mod.name``` (any role) -> the code span ``name`` (``pkg.mod.name`` without ``~``).

It changes only what the docs site shows; the source docstrings stay as they are.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc|py:\w+):`~?([^`]+)`")
_TILDE_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc|py:\w+):`~([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")


def _math_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _MATH_BLOCK.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group("indent")
        body = [m.group("first").strip()] if m.group("first").strip() else []
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            if lines[i].strip():
                body.append(lines[i].strip())
            elif body and i + 1 < len(lines) and not lines[i + 1].startswith(indent + " "):
                break
            i += 1
        out.extend([f"{indent}$$", *(f"{indent}{b}" for b in body), f"{indent}$$"])
    return "\n".join(out)


def rewrite(text: str) -> str:
    text = _math_blocks(text)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    text = _TILDE_ROLE.sub(lambda m: f"``{m.group(1).rsplit('.', 1)[-1]}``", text)
    return _ROLE.sub(lambda m: f"``{m.group(1)}``", text)


class RstMath(griffe.Extension):
    """Rewrite each docstring once the object tree is built (aliases share their target's)."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if not obj.is_alias and obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        self.on_object(obj=pkg)
