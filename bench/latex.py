"""A leaderboard's tables as LaTeX (booktabs rules, through pandas' Styler): the main table, the detail
tables and every report plugin's tables, each a `table` float with a caption and a label, to \\input into a
paper (it needs \\usepackage{booktabs})."""

from __future__ import annotations

import re

import pandas as pd

from bench import markdown_reader

_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
# what pdflatex cannot typeset from UTF-8 by itself
_UNICODE = {"Δ": r"$\Delta$", "ε": r"$\varepsilon$", "α": r"$\alpha$", "γ": r"$\gamma$", "β": r"$\beta$",
            "±": r"$\pm$", "†": r"\dag{}", "‡": r"\ddag{}", "—": "---", "–": "--", "→": r"$\to$", "−": "$-$",
            "≥": r"$\geq$", "≤": r"$\leq$", "∞": r"$\infty$", "×": r"$\times$", "·": r"$\cdot$", "⚠": "(!)",
            "✗": "(x)", "<": "$<$", ">": "$>$", "‖": r"$\|$", "₀": r"\textsubscript{0}"}
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")


def text(value) -> str:
    """A markdown cell or title as LaTeX text: links become their text, code spans plain, specials escaped."""
    plain = _LINK.sub(r"\1", str(value)).replace("`", "")
    escaped = "".join(_SPECIAL.get(ch, ch) for ch in plain)
    return "".join(_UNICODE.get(ch, ch) for ch in escaped)


def _numeric(column: pd.Series) -> bool:
    return all(re.match(r"^[=+\-−—]?\d|^—", str(v)) for v in column) and len(column) > 0


def table(frame: pd.DataFrame, caption: str, label: str) -> str:
    """One booktabs table float; columns of numbers right-aligned."""
    body = pd.DataFrame({i: frame.iloc[:, i].astype(str).map(text) for i in range(frame.shape[1])})
    body.columns = [text(c) for c in frame.columns]
    align = "".join("r" if _numeric(frame.iloc[:, i]) else "l" for i in range(frame.shape[1]))
    out = body.style.hide(axis="index").to_latex(hrules=True, caption=text(caption), label=label,
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
    stem = f"{board.dataset}-{board.arch}-{board.preset}"
    provenance = [ln for ln in board.header if ln.startswith("- Preset")]
    out = [f"% {stem}: tables of `bench leaderboard --format latex`; needs \\usepackage{{booktabs}}.",
           *(f"% {ln[2:]}" for ln in provenance), ""]
    main = board.main.frame.drop(columns=["Run"])
    out += [table(main, f"{board.dataset} / {board.arch} / preset {board.preset}: accuracy in % (95% Wilson "
                        f"interval or mean ± std over seeds). {board.rank_rule}", f"tab:{stem}-leaderboard"), ""]
    for t in board.details:
        out += [table(t.frame, f"{t.title}: accuracy in %.", f"tab:{stem}-{t.anchor}"), ""]
    heading, paragraph, seen = "", "", {}
    for block in markdown_reader.blocks(board.reports):
        if block.kind == "heading":
            heading, paragraph = block.text, ""
        elif block.kind == "paragraph":
            paragraph = block.text
        elif block.kind == "table":
            slug = _slug(heading)
            seen[slug] = seen.get(slug, 0) + 1
            label = f"tab:{stem}-{slug}" + (f"-{seen[slug]}" if seen[slug] > 1 else "")
            # the text that introduces a table tells it apart from another under the same heading
            caption = ". ".join(p.rstrip(":. ") for p in (heading or "Table", paragraph) if p) + "."
            out += [table(block.frame, caption, label), ""]
            paragraph = ""
    return "\n".join(out)
