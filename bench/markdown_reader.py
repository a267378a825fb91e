"""The markdown that report plugins return, read back into blocks (headings, tables, figures, lists,
paragraphs, raw HTML), so the web page and the LaTeX export show the same sections without a second copy
of each report. Only the subset the leaderboard and its reports write is understood."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

_IMAGE = re.compile(r"^!\[(?P<caption>[^\]]*)\]\((?P<src>[^)]+)\)$")
_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")


@dataclass
class Block:
    kind: str  # heading | table | image | list | paragraph | html
    text: str = ""  # heading or paragraph text, image caption, raw HTML
    level: int = 0  # heading level
    frame: pd.DataFrame | None = None  # table cells, as text
    src: str = ""  # image file name
    items: list[str] | None = None  # list items


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def blocks(lines: list[str]) -> list[Block]:
    """The blocks of markdown `lines` (a string holding several lines counts as those lines)."""
    lines = [ln for chunk in lines for ln in str(chunk).split("\n")]
    out: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            i += 1
        elif line.startswith("#"):
            hashes = len(line) - len(line.lstrip("#"))
            out.append(Block("heading", line[hashes:].strip(), level=hashes))
            i += 1
        elif line.startswith("|") and i + 1 < len(lines) and _RULE.match(lines[i + 1].strip()):
            header = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append((_cells(lines[i]) + [""] * len(header))[:len(header)])
                i += 1
            out.append(Block("table", frame=pd.DataFrame(rows, columns=header)))
        elif _IMAGE.match(line.strip()):
            m = _IMAGE.match(line.strip())
            out.append(Block("image", m["caption"], src=m["src"]))
            i += 1
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(lines[i][2:].strip())
                i += 1
            out.append(Block("list", items=items))
        elif line.lstrip().startswith("<"):
            out.append(Block("html", line.strip()))
            i += 1
        else:
            para = [line.strip()]  # the first line whatever it starts with (a '|' line without a rule)
            i += 1
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|", "- ", "<", "![")):
                para.append(lines[i].strip())
                i += 1
            out.append(Block("paragraph", " ".join(para)))
    return out
