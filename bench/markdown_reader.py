"""The markdown of leaderboards: text from runs, plugins and users escaped into it (`escape`, `code`), and that
markdown read back into blocks (headings, tables, figures, lists, paragraphs, raw HTML) and inline spans
(text, code, links, emphasis), so the web page and the LaTeX export show the same sections without a second
copy of each report, and the markup the leaderboard wrote is told apart from the text it holds. Only the
subset the leaderboard and its reports write is understood."""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass

import pandas as pd

_IMAGE = re.compile(r"^!\[(?P<caption>(?:\\.|[^\]\\])*)\]\((?P<src>[^)\s]+)\)$")
_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")

# ----------------------------------------------------------------------------------------------------
# writing: any text as markdown that shows it literally

# controls, and what some readers take for a line break (a markdown line ends a table row or a paragraph)
_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# what starts or ends markup: backslash escapes for ASCII punctuation (CommonMark), `_` only where it could
# emphasise (not between two letters or digits, as in `rift_bn`), `$` for GitHub's math, `|` for table cells
_SPECIAL = re.compile(r"[\\`*\[\]|#~$]|(?<![^\W_])_|_(?![^\W_])")
# at the start of a list item or a line: a nested list or an ordered list
_LEADING = re.compile(r"^(\s*)(?:([-+])|(\d+)([.)]))")


def one_line(value) -> str:
    """`value` as text on one line: controls and line separators as spaces."""
    return _BREAKS.sub(" ", str(value))


def escape(value, *, in_cell: bool = False) -> str:
    """`value` (a name, a parameter, a path: any text) as markdown inline text and table cell that shows it as
    it is: on one line, every character that could start markup escaped, and `&`, `<`, `>` as entities (no
    tag, no link, no extra column, whatever viewer renders it). `in_cell`: the text is a table cell's, read as
    inline text only, where a leading list marker ('1.', '-') is no markup and stays as it is ('12.5')."""
    text = one_line(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _SPECIAL.sub(lambda m: "\\" + m[0], text)
    if in_cell:
        return text
    return _LEADING.sub(lambda m: m[1] + (f"\\{m[2]}" if m[2] else f"{m[3]}\\{m[4]}"), text)


def code(value) -> str:
    """`value` as a code span (a command, a run id) where it can be one: else as escaped text (a backtick,
    `|`, `<` or `>` in it, or nothing to show)."""
    text = one_line(value)
    if not text.strip() or text != text.strip() or re.search(r"[`|<>]", text):
        return escape(text)
    return f"`{text}`"


_ID = re.compile(r"[A-Za-z0-9_-]+")


def anchor(value) -> str:
    """`value` as an HTML id and in-page link target: itself where it is letters, digits, '_' and '-', else
    those with a digest of the whole (two values never share one)."""
    text = str(value)
    if _ID.fullmatch(text):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return (re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:60] or "id") + "-" + digest


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def followable(target: str) -> bool:
    """Whether a link to `target` may be emitted: http(s), or a relative or in-page address. Anything else
    (javascript:, data:, file:, a network path //host) is shown as text."""
    if re.search(r"[\x00-\x20\x7f\\]", target):  # browsers drop these before they read the scheme
        return False
    scheme = _SCHEME.match(target)
    if scheme:
        return scheme[1].lower() in ("http", "https")
    return not target.startswith("//")


# ----------------------------------------------------------------------------------------------------
# reading

@dataclass
class Block:
    kind: str  # heading | table | image | list | paragraph | html
    text: str = ""  # heading or paragraph text, image caption, raw HTML
    level: int = 0  # heading level
    frame: pd.DataFrame | None = None  # table cells, as text
    src: str = ""  # image file name
    items: list[str] | None = None  # list items


def _cells(line: str) -> list[str]:
    """A table row's cells; `\\|` is a `|` inside a cell (GitHub's rule: whatever precedes the backslash)."""
    line = line.strip()
    line = line[1:] if line.startswith("|") else line
    line = line[:-1] if line.endswith("|") and not line.endswith("\\|") else line
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)]


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


# inline spans, in the order they are tried at each position
_INLINE = re.compile(r"""
    \\(?P<escaped>[!-/:-@\[-`{-~])                                    # a backslash escape
  | (?P<entity>&(?:\#[0-9]{1,7}|\#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});)
  | (?P<ticks>`+)(?P<code>.+?)(?<!`)(?P=ticks)(?!`)                     # a code span
  | \[(?P<label>(?:\\.|[^\]\\])+)\]\((?P<target>(?:\\.|[^)\s\\])+)\)   # a link
  | \*\*(?P<strong>(?:\\.|[^*\\])+)\*\*
  | (?<![*\w])\*(?P<em>(?:\\.|[^*\s\\])(?:\\.|[^*\\])*)\*(?![*\w])
""", re.VERBOSE)
_UNESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")


@dataclass
class Span:
    kind: str  # text | code | link | strong | em
    text: str  # text and code: as shown; link, strong, em: their markdown, spans of their own
    target: str = ""  # a link's address, unescaped


def spans(text: str) -> list[Span]:
    """One line of markdown as spans: literal text (escapes and entities resolved), code, links, emphasis."""
    out: list[Span] = []

    def add(literal: str) -> None:
        if out and out[-1].kind == "text":
            out[-1].text += literal
        elif literal:
            out.append(Span("text", literal))

    pos = 0
    for m in _INLINE.finditer(text):
        add(text[pos:m.start()])
        pos = m.end()
        if m["escaped"] is not None:
            add(m["escaped"])
        elif m["entity"] is not None:
            add(html.unescape(m["entity"]))
        elif m["code"] is not None:
            out.append(Span("code", m["code"]))
        elif m["label"] is not None:
            out.append(Span("link", m["label"], _UNESCAPE.sub(r"\1", m["target"])))
        elif m["strong"] is not None:
            out.append(Span("strong", m["strong"]))
        else:
            out.append(Span("em", m["em"]))
    add(text[pos:])
    return out


def plain(text: str) -> str:
    """One line of markdown as the text it shows: links as their text (with the address where it leads off
    the page, so nothing is dropped silently), code and emphasis as their content."""
    out = []
    for span in spans(text):
        if span.kind in ("text", "code"):
            out.append(span.text)
        elif span.kind == "link":
            out.append(plain(span.text) + ("" if span.target.startswith("#") else f" ({span.target})"))
        else:
            out.append(plain(span.text))
    return "".join(out)
