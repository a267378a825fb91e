"""The markdown a report plugin writes: any text is plain and gets escaped (markdown_reader.escape), unless it
is `Markdown` already, so that a name from a run, a parameter or an attack never becomes markup, a link or a
table column; and the tables of such cells."""

from __future__ import annotations

from bench.markdown_reader import code, escape, one_line


class Markdown(str):
    """Text that is markdown already: a report's own markup, or what `markdown_text`, `markdown_code` and the
    `ReportContext` helpers (`rc.accuracy`, `rc.delta`, the marks) return. `rc.table` writes it as it is and
    escapes any other text. Joining gives a plain `str` again (`+`, an f-string): a table cell of several
    pieces is a list of them."""

    __slots__ = ()


def markdown_text(value) -> Markdown:
    """`value` (a name, a label, a parameter value: any text) as markdown that shows it as it is, on one line:
    no tag, link, emphasis, list or table column can come from it. `Markdown` is returned as it is, and a
    number as its digits."""
    if isinstance(value, Markdown):
        return value
    if isinstance(value, (int, float)):  # digits, '.', '-', 'e', 'inf', 'nan': never markup
        return Markdown(value)
    return Markdown(escape(value))


def markdown_code(value) -> Markdown:
    """`value` (a command, a short name) as a code span where it can be one, else as `markdown_text`."""
    return Markdown(code(value))


def _cell(value) -> str:
    if isinstance(value, (list, tuple)):
        return "".join(_cell(piece) for piece in value)
    if isinstance(value, Markdown):
        return one_line(value)  # a newline would end the row, whatever the markup around it
    return escape(value, in_cell=True)


def table(columns: list, rows: list[list]) -> Markdown:
    """A markdown (pipe) table of `rows` under `columns`. Every header and cell is plain text, escaped, except
    `Markdown`, written as it is; a cell given as a list joins its pieces, each by the same rule
    (`[f"{error:.1f}", rc.fewer_attacks_mark(cfg, peers, threat)]`)."""
    from tabulate import tabulate

    return Markdown(tabulate([[_cell(v) for v in row] for row in rows], headers=[_cell(c) for c in columns],
                             tablefmt="pipe", disable_numparse=True))
