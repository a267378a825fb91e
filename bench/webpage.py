"""A leaderboard as one self-contained static web page: no network, no CDN, figures inlined as base64.

The main table sorts by any column (click its header) and filters by defense (vanilla JavaScript); the detail
tables, the report plugins' sections and every run's details (parameters, checks with their detail, the
command, the code version) follow.

Every string on the page is escaped here (`escape`), whatever its source; markup comes only from the page's
own code and from the leaderboard's markdown (`inline`, `markdown_html`), whose links are followed only to
http(s), relative and in-page addresses. A Content-Security-Policy lets no script run but the page's own and
the page fetch nothing."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re

from bench import markdown_reader

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1rem 1.5rem 4rem; color: #1b1f24; background: #fff; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.3rem; margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 1.1rem; margin-top: 1.6rem; } h4 { font-size: 1rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: .25rem .55rem; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #f9fafb; }
table.sortable th { cursor: pointer; user-select: none; white-space: nowrap; position: sticky; top: 0; }
table.sortable th::after { content: " ↕"; color: #8c959f; }
table.sortable th[aria-sort="ascending"]::after { content: " ▲"; color: #1b1f24; }
table.sortable th[aria-sort="descending"]::after { content: " ▼"; color: #1b1f24; }
.controls { margin: .8rem 0 .2rem; } .controls select { font-size: 14px; margin-left: .3rem; }
.count { color: #57606a; margin-left: 1rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 14px; }
code { background: #f3f5f7; padding: 0 .25rem; border-radius: 3px; font-size: 13px; }
details.run { border: 1px solid #d0d7de; border-radius: 4px; margin: .35rem 0; padding: .3rem .6rem; }
details.run[open] { background: #fbfcfd; } summary { cursor: pointer; }
.status-fail { color: #b42318; font-weight: 600; } .status-warn { color: #9a6700; font-weight: 600; }
.status-pass { color: #1a7f37; } .status-skip { color: #57606a; }
"""

SCRIPT = """
(function () {
  "use strict";
  function sortKey(cell) {
    var v = cell.getAttribute("data-sort");
    if (v !== null && v !== "" && !isNaN(Number(v))) { return {num: true, v: Number(v)}; }
    return {num: false, v: cell.textContent.trim().toLowerCase()};
  }
  function sortBy(table, col, th) {
    var numeric = th.getAttribute("data-type") === "number";
    var current = th.getAttribute("aria-sort");
    var first = th.getAttribute("data-first") || (numeric ? "descending" : "ascending");
    var dir = current === null ? first : (current === "ascending" ? "descending" : "ascending");
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir);
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var sign = dir === "ascending" ? 1 : -1;
    rows.sort(function (a, b) {
      var x = sortKey(a.cells[col]), y = sortKey(b.cells[col]);
      if (x.num !== y.num) { return x.num ? -1 : 1; }  // cells without a number ("—") go last
      if (x.v < y.v) { return -sign; }
      if (x.v > y.v) { return sign; }
      return Number(a.getAttribute("data-order")) - Number(b.getAttribute("data-order"));
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("thead th").forEach(function (th, col) {
      th.addEventListener("click", function () { sortBy(table, col, th); });
    });
  });
  var filter = document.getElementById("defense-filter");
  var count = document.getElementById("row-count");
  function applyFilter() {
    var shown = 0, rows = document.querySelectorAll("#leaderboard tbody tr");
    rows.forEach(function (r) {
      r.hidden = filter.value !== "" && r.getAttribute("data-defense") !== filter.value;
      if (!r.hidden) { shown += 1; }
    });
    count.textContent = shown + " of " + rows.length + " rows";
  }
  filter.addEventListener("change", applyFilter);
  applyFilter();
  function openTarget() {  // a link to a run opens its folded details
    var id = decodeURIComponent(location.hash.slice(1));
    var el = id && document.getElementById(id);
    if (el && el.tagName === "DETAILS") { el.open = true; }
  }
  window.addEventListener("hashchange", openTarget);
  openTarget();
})();
"""


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode("ascii") + "'"


# no script but SCRIPT (the data block is not one), no style but STYLE, images only inline, nothing fetched
POLICY = (f"default-src 'none'; script-src {_digest(SCRIPT)}; style-src {_digest(STYLE)}; img-src data:; "
          "base-uri 'none'; form-action 'none'")


def escape(value) -> str:
    """Any text as HTML text or attribute value (quotes included): shown as it is, never markup."""
    return html.escape(str(value), quote=True)


def inline(text: str) -> str:
    """One line of the leaderboard's markdown as HTML: its text escaped, its code spans, links (only those
    `markdown_reader.followable`; others shown as text) and emphasis as tags."""
    out = []
    for span in markdown_reader.spans(str(text)):
        if span.kind == "text":
            out.append(escape(span.text))
        elif span.kind == "code":
            out.append(f"<code>{escape(span.text)}</code>")
        elif span.kind == "link" and markdown_reader.followable(span.target):
            out.append(f'<a href="{escape(span.target)}">{inline(span.text)}</a>')
        elif span.kind == "link":
            out.append(f"{inline(span.text)} ({escape(span.target)})")
        else:
            tag = "strong" if span.kind == "strong" else "em"
            out.append(f"<{tag}>{inline(span.text)}</{tag}>")
    return "".join(out)


def slug(title: str) -> str:
    """GitHub's heading anchors (of the heading's text), so the markdown's in-page links work on the page too."""
    return re.sub(r"[^\w\- ]", "", markdown_reader.plain(title).lower()).strip().replace(" ", "-")


# the only raw HTML the leaderboard's markdown holds (folded check details, link targets): any other line that
# starts with '<' is shown as text
_OWN_HTML = re.compile(r'(<details>)?<summary>[^<>&"]*</summary>|</?details>|<a id="[A-Za-z0-9_-]+"></a>')


def _number(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.6g}"


def table_html(table, *, sortable: bool = False, links=None, element_id: str = "") -> str:
    """A bench.leaderboard.Table (its cells plain text) as an HTML table; with `sortable`, numbers to sort by
    in data-sort; `links(column, config, text)` gives a cell's HTML where it links somewhere."""
    frame, values = table.frame, table.values
    numeric = {c for c in frame.columns if values is not None and c in values and values[c].notna().any()}
    head = []
    for c in frame.columns:
        attrs = ' data-type="number"' if c in numeric else ""
        attrs += ' data-first="ascending"' if c == "Rank" else ""
        head.append(f"<th{attrs}>{escape(c)}</th>")
    rows = []
    for i in range(len(frame)):
        cfg = table.configs[i] if i < len(table.configs) else None
        attrs = f' data-order="{i}"' + (f' data-defense="{escape(cfg.defense)}"' if cfg is not None else "")
        cells = []
        for c in frame.columns:
            text = str(frame.iloc[i][c])
            content = links(c, cfg, text) if links is not None and cfg is not None else None
            content = content if content is not None else escape(text)
            if c in numeric:
                cells.append(f'<td class="num" data-sort="{_number(values.iloc[i][c])}">{content}</td>')
            else:
                cells.append(f"<td>{content}</td>")
        rows.append(f"<tr{attrs}>{''.join(cells)}</tr>")
    ident = f' id="{escape(element_id)}"' if element_id else ""
    cls = ' class="sortable"' if sortable else ""
    return (f"<table{ident}{cls}><thead><tr>{''.join(head)}</tr></thead>"
            f"<tbody>\n{chr(10).join(rows)}\n</tbody></table>")


def markdown_html(lines: list[str], figures: dict) -> list[str]:
    """The leaderboard's markdown (header, report sections) as HTML; figures inlined from `figures`."""
    out = []
    for block in markdown_reader.blocks(lines):
        if block.kind == "heading":
            level = min(block.level, 6)
            out.append(f'<h{level} id="{escape(slug(block.text))}">{inline(block.text)}</h{level}>')
        elif block.kind == "table":
            out.append("<table><thead><tr>" + "".join(f"<th>{inline(c)}</th>" for c in block.frame.columns)
                       + "</tr></thead><tbody>" + "".join(
                           "<tr>" + "".join(f"<td>{inline(v)}</td>" for v in row) + "</tr>"
                           for row in block.frame.itertuples(index=False)) + "</tbody></table>")
        elif block.kind == "image":
            path = figures.get(block.src.rsplit("/", 1)[-1])
            caption = f"<figcaption>{inline(block.text)}</figcaption>"
            if path is None or not path.exists():
                out.append(f"<figure>{caption} (figure not drawn)</figure>")
                continue
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            alt = escape(markdown_reader.plain(block.text))
            out.append(f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
                       f"{caption}</figure>")
        elif block.kind == "list":
            out.append("<ul>" + "".join(f"<li>{inline(item)}</li>" for item in block.items) + "</ul>")
        elif block.kind == "html" and _OWN_HTML.fullmatch(block.text):
            out.append(block.text)
        else:
            out.append(f"<p>{inline(block.text)}</p>")
    return out


def _status_cell(status: str) -> str:
    return f'<td class="status-{escape(markdown_reader.anchor(status))}">{escape(status)}</td>'


def runs_html(board) -> list[str]:
    """Per row: every parameter, the seeds' run ids, commands and code versions, and every check's detail."""
    out = ['<h2 id="runs">Runs: parameters, checks, commands</h2>',
           "<p>One entry per row of the leaderboard (its Run column links here); unfold it for every parameter, "
           "each seed's command, code version and sanity checks with their detail.</p>"]
    for cfg in board.main.configs:
        row = board.rows[cfg.key]
        summaries = row["checks"]
        facts = [("Defense", escape(cfg.defense)), ("Parameters", escape(row["params"])),
                 ("Seeds", escape(", ".join(map(str, cfg.seeds))))]
        body = []
        for r in cfg.runs:
            run = r.run
            seed = f" (seed {run['seed']})" if len(cfg.runs) > 1 else ""
            facts += [(f"Run id{seed}", f"<code>{escape(run['run_id'])}</code>"),
                      (f"Command{seed}", f"<code>{escape(run['command'] or '(none stored)')}</code>"),
                      (f"Code version{seed}", escape(run["code_version"]))]
            if r.checks:
                rows = "".join(f"<tr><td>{escape(c['name'])}</td>{_status_cell(c['status'])}"
                               f"<td>{escape(c['detail'])}</td></tr>" for c in r.checks)
                body.append(f"<h4>Sanity checks{seed}</h4><table><thead><tr><th>Check</th><th>Status</th>"
                            f"<th>Detail</th></tr></thead><tbody>{rows}</tbody></table>")
        table = "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in facts)
        out.append(f'<details class="run" id="{escape(row["anchor"])}"><summary><code>{escape(cfg.key)}</code> '
                   f"{escape(row['name'])}: checks {escape(summaries)}</summary>"
                   f"<table>{table}</table>{''.join(body)}</details>")
    return out


def page(board) -> str:
    """The whole page of `board` (a bench.leaderboard.Board)."""
    figures = {p.name: p for p in board.figures}
    title = f"{board.dataset} / {board.arch} / preset {board.preset}"

    def links(column, cfg, text):
        if column == "Run":
            return f'<a href="#{escape(board.rows[cfg.key]["anchor"])}">{escape(text)}</a>'
        if column == "Flags" and text:
            return f'<a href="#{escape(board.rows[cfg.key]["anchor"])}">{escape(text)}</a>'
        return None

    defenses = sorted({cfg.defense for cfg in board.configs})
    options = "".join(f'<option value="{escape(d)}">{escape(d)}</option>' for d in defenses)
    header = [ln.replace("(#reproduce)", "(#runs)").replace("(#sanity-checks)", "(#runs)") for ln in board.header]
    body = markdown_html(header, figures)
    body += ['<div class="controls"><label for="defense-filter">Defense</label>'
             f'<select id="defense-filter"><option value="">all defenses</option>{options}</select>'
             '<span class="count" id="row-count"></span> <span class="count">Click a column header to sort.</span>'
             "</div>", table_html(board.main, sortable=True, links=links, element_id="leaderboard")]
    if board.details:
        body += ['<h2 id="every-attack-by-threat-model">Every attack, by threat model</h2>',
                 "<p>Rows in the leaderboard's order, only those attacked under the threat model.</p>"]
        for t in board.details:
            body += [f'<h3 id="{escape(t.anchor)}">{escape(t.title)}</h3>', table_html(t)]
    body += markdown_html(board.reports, figures)
    body += runs_html(board)
    # a data block, never run; '<', '>' and '&' as JSON escapes so that no text in it can close the element
    meta = json.dumps({"dataset": board.dataset, "arch": board.arch, "preset": board.preset})
    meta = meta.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">',  # before anything it governs
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request: the page asks nothing of any server
        f"<title>{escape(title)}: bnbench leaderboard</title>",
        f"<style>{STYLE}</style>", f'<script type="application/json" id="board-meta">{meta}</script>',
        "</head>", "<body>", *body, f"<script>{SCRIPT}</script>", "</body>", "</html>", ""])
