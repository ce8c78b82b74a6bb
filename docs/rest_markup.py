"""A Griffe extension that turns the reST markup of our docstrings into Markdown for mkdocstrings.

The docstrings are Google-style sections (``Args:``, ``Returns:``) written with reST inline
markup, as Sphinx reads them. mkdocstrings renders Markdown, so before it parses a docstring
this extension rewrites:

- cross-reference roles, ``:func:`~involution.ops.involution2d``` -> a code span
  (``involution2d``; the ``~`` form keeps the last name, as Sphinx shows it);
- ``:math:`x``` -> ``\\(x\\)`` and ``.. math::`` blocks -> ``$$ ... $$`` (pymdownx.arithmatex);
- a paragraph ending in ``::`` (a reST literal block follows) -> one ending in ``:``; the
  indented block after it is already a Markdown code block;
- an ``Args:`` entry naming several parameters, ``stride, padding: ...`` (Sphinx's napoleon
  reads it, Griffe's Google parser does not) -> one entry per parameter, each with the text.

Loaded by the python handler's ``extensions`` option in ``mkdocs.yml``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|obj|exc):`(~?)([^`]+)`")
INLINE_MATH = re.compile(r":math:`([^`]+)`")
MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")
LITERAL_INTRO = re.compile(r"(\S)::$")
ARGS_SECTION = re.compile(r"^(?P<indent>[ \t]*)(?:Args|Arguments|Parameters):[ \t]*$")
SHARED_ENTRY = re.compile(r"^(?P<indent>[ \t]+)(?P<names>\w+(?:, \w+)+):(?P<text>.*)$")


def role_to_code(match: re.Match[str]) -> str:
    """``:func:`~a.b.c``` -> ```c```, ``:mod:`a.b``` -> ```a.b```."""
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def math_blocks(lines: list[str]) -> list[str]:
    """Each ``.. math::`` directive and its indented body as one ``$$`` block."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = MATH_DIRECTIVE.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body = [match["first"].strip()] if match["first"].strip() else []
        i += 1
        # The body: the lines indented deeper than the directive (blank lines inside included).
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        out += ["", f"{indent}$$", *(f"{indent}{line}" for line in body), f"{indent}$$", ""]
    return out


def indent_of(line: str) -> int:
    """The number of leading spaces and tabs of ``line``."""
    return len(line) - len(line.lstrip())


def split_shared_entries(lines: list[str]) -> list[str]:
    """In ``Args:`` sections, ``a, b: text`` and its continuation -> ``a: text``, ``b: text``."""
    out: list[str] = []
    section_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if (section := ARGS_SECTION.match(line)) is not None:
            section_indent = len(section["indent"])
        elif line.strip() and section_indent is not None and indent_of(line) <= section_indent:
            section_indent = None  # the section ended
        entry = SHARED_ENTRY.match(line) if section_indent is not None else None
        if entry is None:
            out.append(line)
            i += 1
            continue
        i += 1
        continuation = []
        while i < len(lines) and lines[i].strip() and indent_of(lines[i]) > len(entry["indent"]):
            continuation.append(lines[i])
            i += 1
        for name in entry["names"].split(", "):
            out += [f"{entry['indent']}{name}:{entry['text']}", *continuation]
    return out


def rest_to_markdown(text: str) -> str:
    """The Markdown equivalent of a docstring's reST markup (see the module docstring)."""
    text = ROLE.sub(role_to_code, text)
    text = INLINE_MATH.sub(lambda m: f"\\({m[1]}\\)", text)
    lines = split_shared_entries(math_blocks(text.splitlines()))
    return "\n".join(LITERAL_INTRO.sub(r"\1:", line) for line in lines)


class RestMarkup(griffe.Extension):
    """Rewrites every docstring's reST markup as Markdown when Griffe loads the object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rest_to_markdown(obj.docstring.value)
