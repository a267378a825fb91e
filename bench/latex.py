"""A leaderboard's tables as LaTeX (booktabs rules, through pandas' Styler): the main table, the detail
tables and every report plugin's tables, each a `table` float with a caption and a label, to \\input into a
paper (it needs \\usepackage{booktabs})."""

from __future__ import annotations

import re

import pandas as pd

from bench import markdown_reader

_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
            # read as an argument after a row's \\ ([, *), or typeset as something else (| in OT1, ` as a quote)
            "[": "{[}", "]": "{]}", "*": "{*}", "|": r"\textbar{}", "`": r"\textasciigrave{}"}
# what pdflatex cannot typeset from UTF-8 by itself
_UNICODE = {"Δ": r"$\Delta$", "ε": r"$\varepsilon$", "α": r"$\alpha$", "γ": r"$\gamma$", "β": r"$\beta$",
            "±": r"$\pm$", "†": r"\dag{}", "‡": r"\ddag{}", "—": "---", "–": "--", "→": r"$\to$", "−": "$-$",
            "≥": r"$\geq$", "≤": r"$\leq$", "∞": r"$\infty$", "×": r"$\times$", "·": r"$\cdot$", "⚠": "(!)",
            "✗": "(x)", "<": "$<$", ">": "$>$", "‖": r"$\|$", "₀": r"\textsubscript{0}", "\u00a0": " "}
# the Latin letters and signs LaTeX's utf8 input and T1 fonts typeset (U+00A1-U+017F but these); any other
# character is shown by its code point
_UNSET = {0xAD, 0x126, 0x127, 0x138, 0x13F, 0x140, 0x149, 0x166, 0x167, 0x17F}


def _char(ch: str, following: str) -> str:
    if ch in _SPECIAL:
        return _SPECIAL[ch]
    if ch in _UNICODE:
        return _UNICODE[ch]
    if ch in "-,'" and following == ch:  # not the ligatures -- (en dash), ,, and '' (quotes)
        return ch + "{}"
    if " " <= ch <= "~" or (0xA1 <= ord(ch) <= 0x17F and ord(ch) not in _UNSET):
        return ch
    return "{[}U+%04X{]}" % ord(ch)


def escape(value) -> str:
    """Any text (a name, a parameter, a caption) as LaTeX text that shows it as it is: on one line, every
    special character escaped, a character pdflatex cannot typeset as its code point."""
    plain = markdown_reader.one_line(value)
    return "".join(_char(ch, plain[i + 1:i + 2]) for i, ch in enumerate(plain))


def text(value) -> str:
    """A markdown cell or title (a report's) as LaTeX text: what it shows (markdown_reader.plain: links as
    their text, with the address where it leads off the page), escaped."""
    return escape(markdown_reader.plain(markdown_reader.one_line(value)))


def _numeric(column: pd.Series) -> bool:
    return all(re.match(r"^[=+\-−—]?\d|^—", str(v)) for v in column) and len(column) > 0


def table(frame: pd.DataFrame, caption: str, label: str, *, markdown: bool = False) -> str:
    """One booktabs table float of `frame`'s cells (plain text, or with `markdown` a report's markdown);
    `caption` plain text; columns of numbers right-aligned."""
    convert = text if markdown else escape
    body = pd.DataFrame({i: frame.iloc[:, i].astype(str).map(convert) for i in range(frame.shape[1])})
    columns: list[str] = []
    for c in frame.columns:  # two names alike once escaped stay two columns
        name = convert(c)
        while name in columns:
            name += "{}"
        columns.append(name)
    body.columns = columns
    align = "".join("r" if _numeric(frame.iloc[:, i]) else "l" for i in range(frame.shape[1]))
    out = body.style.hide(axis="index").to_latex(hrules=True, caption=escape(caption), label=label,
                                                  position_float="centering", column_format=align)
    # a leaderboard's rows carry intervals, deltas and flags: small type keeps it inside a landscape page, and
    # smaller where its widest cells would not fit there
    return out.replace("\\centering\n", f"\\centering\n\\{type_size(frame)}\n", 1)


# Computer Modern digits are half an em wide; \tabcolsep puts 6 pt each side of a column; a landscape page
# with 1 cm margins leaves about 730 pt of text width.
_SIZES = (("small", 9.0), ("footnotesize", 8.0), ("scriptsize", 7.0), ("tiny", 6.0))
_TEXT_WIDTH_PT = 730.0


def type_size(frame: pd.DataFrame) -> str:
    """The largest of \\small, \\footnotesize, \\scriptsize, \\tiny at which `frame`'s widest cells fit the page."""
    chars = sum(max([len(str(c))] + [len(str(v)) for v in frame.iloc[:, i]]) for i, c in enumerate(frame.columns))
    for name, points in _SIZES:
        if chars * points / 2 + 12 * frame.shape[1] <= _TEXT_WIDTH_PT:
            return name
    return _SIZES[-1][0]


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40] or "table"


def document(board) -> str:
    """Every table of `board` (a bench.leaderboard.Board), the main table first."""
    stem = board.stem or _slug(f"{board.dataset}-{board.arch}-{board.preset}")  # a safe file name: labels use it
    provenance = [ln for ln in board.header if ln.startswith("- Preset")]
    out = [f"% {stem}: tables of `bench leaderboard --format latex`; needs \\usepackage{{booktabs}} (and "
           f"\\usepackage[T1]{{fontenc}} for accented names).",
           *(f"% {markdown_reader.plain(markdown_reader.one_line(ln[2:]))}" for ln in provenance), ""]
    main = board.main.frame.drop(columns=["Run"])
    out += [table(main, f"{board.dataset} / {board.arch} / preset {board.preset}: accuracy in % (95% Wilson "
                        f"interval or mean ± std over seeds). {board.rank_rule}", f"tab:{stem}-leaderboard"), ""]
    for t in board.details:
        out += [table(t.frame, f"{t.title}: accuracy in %.", f"tab:{stem}-{t.anchor}"), ""]
    heading, paragraph, seen = "", "", {}
    for block in markdown_reader.blocks(board.reports):
        if block.kind == "heading":
            heading, paragraph = markdown_reader.plain(block.text), ""
        elif block.kind == "paragraph":
            paragraph = markdown_reader.plain(block.text)
        elif block.kind == "table":
            slug = _slug(heading)
            seen[slug] = seen.get(slug, 0) + 1
            label = f"tab:{stem}-{slug}" + (f"-{seen[slug]}" if seen[slug] > 1 else "")
            # the text that introduces a table tells it apart from another under the same heading
            caption = ". ".join(p.rstrip(":. ") for p in (heading or "Table", paragraph) if p) + "."
            out += [table(block.frame, caption, label, markdown=True), ""]
            paragraph = ""
    return "\n".join(out)
