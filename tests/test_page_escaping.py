"""Every string that reaches a page is escaped for its format, whatever its source (issue 40: H1, H2, H3,
MD1, L1): plugin names and parameters, attack labels, results-database fields (runs.config, run_id, commands,
checks), the --out path and --meta. Hostile strings go through every source into the markdown, HTML and LaTeX
boards; the HTML holds no element, attribute or link that came from them, the markdown tables keep their
columns, the LaTeX compiles and shows the text as it is. Boards are built from stored cells: nothing trains."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bench import latex, leaderboard, markdown_reader, webpage
from bench.errors import BenchError
from bench.leaderboard import Config, Run
from bench.store import Store

HOSTILE = [
    "[open paper](javascript:alert%28document.domain%29)",  # H1
    "<img src=x onerror=alert(1)>",
    '"><svg onload=alert(2)>',
    "two\nlines <img src=x onerror=alert(3)>\r\n| a | b |",  # H3, MD1
    "p|q||r",
    "`code` ``x`` ```",
    "back\\slash \\ \\\\",
    "{}$&%#_^~\\ \\textbf{x} \\input{/etc/passwd} $x^2$",
    "<script>alert(4)</script></script><script>alert(5)</script>",
    "![img](javascript:alert(6)) [a](data:text/html,x) [b](JaVaScRiPt:alert(7)) [c](//evil.example/x)",
    "**bold** *em* _u_ __dunder__ ~~strike~~ &lt;entity&gt; &amp; &#60;script&#62;",
    "# heading",
    "- item",
    "1. ordered",
    "> quote",
    "ünïcödé ΔΣ 中文 🙂 \u202e rtl \u2028 sep",
    "tab\tand\x00nul\x1b[31m",
    "x" * 400 + "<b>long</b>",
]
RUN_ID_BREAKOUT = '"><svg onl'  # 10 characters: run_id[:10] was put into id="run-..." unescaped (H3)
OUT_NAME = "r\n<img src=x onerror=alert(8)>"  # H2: the --out path shown in the "Regenerate" line
META = {"link": "javascript:alert(9)", "authors": "<script>alert(10)</script>", "venue": "[v](javascript:x)"}
HOSTILE_DATASET = "../../d<img src=x onerror=alert(11)>"
ARCH = "tiny_cnn"

# ----------------------------------------------------------------------------------------------------
# what a safe page may hold


PAGE_TAGS = {"html", "head", "meta", "link", "title", "style", "script", "body", "h1", "h2", "h3", "h4", "h5",
             "h6", "p", "ul", "li", "code", "a", "strong", "em", "table", "thead", "tbody", "tr", "th", "td", "div",
             "label", "select", "option", "span", "figure", "img", "figcaption", "details", "summary"}
PAGE_ATTRIBUTES = {"lang", "charset", "http-equiv", "content", "name", "rel", "href", "id", "class", "type", "src",
                   "alt", "value", "for", "data-type", "data-first", "data-order", "data-defense", "data-sort"}


class _Page(HTMLParser):
    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.scripts: list[tuple[dict, str]] = []
        self.text: list[str] = []
        self._script: list | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag == "script":
            self._script = [dict(attrs), ""]

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag == "script" and self._script is not None:
            self.scripts.append(tuple(self._script))
            self._script = None

    def handle_data(self, data):
        if self._script is not None:
            self._script[1] += data
        else:
            self.text.append(data)


def _flat(text: str) -> str:
    """Text with every run of whitespace, control or line separator as one space: how a page shows it."""
    return " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", " ", text).split())


def assert_safe_html(text: str, shown: list[str] = ()) -> _Page:
    """No element, attribute, script or link on the page but its own; every string of `shown` visible as text."""
    page = _Page(text)
    tags = {tag for tag, _ in page.elements}
    assert tags <= PAGE_TAGS, tags - PAGE_TAGS
    ids = set()
    for tag, attrs in page.elements:
        assert set(attrs) <= PAGE_ATTRIBUTES, (tag, attrs)
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        if "id" in attrs:
            assert re.fullmatch(r"[\w-]+", attrs["id"]), attrs["id"]
            ids.add(attrs["id"])
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,"), attrs["src"][:80]
        if tag == "link":
            assert attrs == {"rel": "icon", "href": "data:,"}
        if tag == "meta":
            assert set(attrs) in ({"charset"}, {"name", "content"}, {"http-equiv", "content"}), attrs
    links = [attrs["href"] for tag, attrs in page.elements if tag == "a"]
    assert all(h.startswith("#") or re.match(r"https?://", h) for h in links), links
    assert {h[1:] for h in links if h.startswith("#")} <= ids  # every in-page link leads somewhere on the page
    # the page's own two scripts: the data block and SCRIPT, which the policy names by its hash
    assert [attrs for attrs, _ in page.scripts] == [{"type": "application/json", "id": "board-meta"}, {}]
    data, code = (body for _, body in page.scripts)
    assert set(json.loads(data)) == {"dataset", "arch", "preset"} and code == webpage.SCRIPT
    policy = next(attrs["content"] for tag, attrs in page.elements
                  if attrs.get("http-equiv") == "Content-Security-Policy")
    digest = base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'" and directives["script-src"] == f"'sha256-{digest}'"
    assert directives["img-src"] == "data:" and "unsafe" not in policy
    first = [tag for tag, attrs in page.elements if tag in ("script", "style") or "http-equiv" in attrs]
    assert first[0] == "meta"  # the policy comes before anything it governs
    visible = _flat(" ".join(page.text))
    for s in shown:
        assert _flat(s) in visible, s
    return page


OWN_MARKUP = re.compile(r'<(?:a id="[A-Za-z0-9_-]+"></a>|/?details>|summary>|/summary>)')


def table_rows(text: str) -> list[list[str]]:
    """The markdown tables of `text`, each as its lines' cell counts (GitHub's rule: a '|' after a backslash
    is in a cell)."""
    tables, current = [], []
    for line in text.split("\n") + [""]:
        if line.startswith("|"):
            current.append(len(re.split(r"(?<!\\)\|", line.strip())) - 2)
        elif current:
            tables.append(current)
            current = []
    return tables


def assert_safe_markdown(text: str, shown: list[str] = ()) -> None:
    """Every table keeps its columns; no tag but the leaderboard's own; no link but to the page or a figure;
    every string of `shown` read back as text."""
    for counts in table_rows(text):
        assert len(counts) >= 3 and len(set(counts)) == 1, counts
    own = {i for m in OWN_MARKUP.finditer(text) for i in range(m.start(), m.end())}
    tags = [m.start() for m in re.finditer(r"<[A-Za-z/!?]", text)]  # what could open a tag (not 'p < 0.05')
    assert [i for i in tags if i not in own] == [], [text[i:i + 40] for i in tags if i not in own]
    unspanned = re.sub(r"(`+).+?(?<!`)\1(?!`)", "", re.sub(r"\\.", "_", text))  # no link inside a code span
    for m in re.finditer(r"\]\(([^)]*)\)", unspanned):
        assert m[1].startswith("#") or re.fullmatch(r"[A-Za-z0-9_.-]+\.png", m[1]), m[0]
    for line in text.split("\n"):
        assert not line.startswith(("#", "- ")) or re.match(r"#+ |- ", line), line
    shown_text = []
    for block in markdown_reader.blocks(text.split("\n")):
        if block.kind == "table":
            shown_text += [markdown_reader.plain(c) for c in block.frame.columns]
            shown_text += [markdown_reader.plain(v) for row in block.frame.itertuples(index=False) for v in row]
        else:
            shown_text += [markdown_reader.plain(t) for t in [block.text, *(block.items or [])]]
    everything = _flat(" ".join(shown_text))
    for s in shown:
        assert _flat(s) in everything, s


_UNTEX = [(r"\textbackslash{}", "\\"), (r"\textasciitilde{}", "~"), (r"\textasciicircum{}", "^"),
          (r"\textbar{}", "|"), (r"\textasciigrave{}", "`"), ("{[}", "["), ("{]}", "]"), ("{*}", "*"), ("-{}", "-"),
          (",{}", ","), ("'{}", "'"), (r"\&", "&"), (r"\%", "%"), (r"\$", "$"), (r"\#", "#"), (r"\_", "_"),
          (r"\{", "{"), (r"\}", "}"),
          # the signs bench.latex writes as math or commands (longest first: --- before --)
          *sorted(((v, k) for k, v in latex._UNICODE.items() if k != "\u00a0"), key=lambda kv: -len(kv[0]))]


def untex(text: str) -> str:
    """LaTeX as the text it typesets (the escapes bench.latex writes, read back in one pass; a character
    shown by its code point as that character)."""
    pattern = re.compile(r"\{\[\}U\+([0-9A-F]{4,6})\{\]\}|" + "|".join(re.escape(k) for k, _ in _UNTEX))
    back = dict(_UNTEX)
    return pattern.sub(lambda m: chr(int(m[1], 16)) if m[1] else back[m[0]], text)


def assert_safe_latex(text: str, shown: list[str] = ()) -> None:
    """Nothing a name holds becomes a command, a group, math, a column or a row; every string of `shown`
    typeset as it is (on one line)."""
    body = "\n".join(ln for ln in text.split("\n") if not ln.startswith("%"))
    stripped = re.sub(r"\\(?:textbackslash|textasciitilde|textasciicircum|textbar|textasciigrave|dag|ddag)\{\}|"
                      r"\\textsubscript\{0\}|\{\[\}|\{\]\}|\{\*\}|-\{\}|,\{\}|'\{\}|\\[&%$#_{}]|"
                      r"\$\\?[A-Za-z<>|-]*\$", "", body)
    tables = stripped.split("\\begin{tabular}")[1:]
    assert len(tables) == body.count("\\begin{table}")
    for table in tables:
        rows = table.split("\\toprule", 1)[1].split("\\bottomrule", 1)[0].replace("\\midrule", "").split("\\\\")
        rows = [r for r in rows if r.strip()]
        assert len({r.count("&") for r in rows}) == 1, rows  # every row as many columns as the header
        for row in rows:
            assert not re.search(r"[%#_^~$\\{}]", row), row  # no special character left unescaped
    for caption in re.findall(r"\\caption\{(.*)\}", stripped):
        assert not re.search(r"[%#_^~$\\{}]", caption), caption
    typeset = _flat(untex(body.replace("\\\\", "\n")))
    for s in shown:
        assert _flat(markdown_reader.one_line(s).replace("\u00a0", " ")) in typeset, s


def compile_latex(tex: str, tmp: Path) -> str:
    """pdflatex typesets `tex` \\input into a paper (test_reports compiles its board with it too); its log."""
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed (.ci/run installs texlive-latex-recommended)")
    (tmp / "board.tex").write_text(tex)
    (tmp / "paper.tex").write_text(
        "\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{booktabs}\n"
        "\\usepackage[margin=1cm,landscape]{geometry}\n\\begin{document}\n\\input{board}\n\\end{document}\n")
    res = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"], cwd=tmp,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:]
    assert (tmp / "paper.pdf").stat().st_size > 0
    return res.stdout


# ----------------------------------------------------------------------------------------------------
# the hostile results database: every source at once


def _put_run(store: Store, run_id: str, defense: str, params: dict, *, dataset="digits", data="f1301c",
             command="bench run", code_version="abc1234", meta=None) -> None:
    store.put_run({"run_id": run_id, "defense": defense, "params": params, "preset": "smoke", "dataset": dataset,
                   "arch": ARCH, "seed": 0, "precision": "fp32",
                   "config": {"data": data, "defense": defense, "params": sorted(params.items()),
                              "preset": {"eps": 0.1}},
                   "command": command, "code_version": code_version, "batch_dependent": 0, "randomized": 0,
                   "has_surrogate": 0, "info": {"bench": {"meta": meta or {}}}, "build_seconds": 0.0})


def _put_cells(store: Store, run_id: str, rng, attack: str = "pgd+eot", note: str = "", n: int = 40,
               budgets=(0.1,)) -> None:
    clean = rng.random(n) < 0.8
    store.put_cell(run_id, attack="clean", protocol="-", name="clean", params={}, norm="Linf", eps=0.1,
                   threat="Linf eps=0.1", flags=clean, seconds=1.0, extra={})
    for eps in budgets:
        label = f"{attack}[eps={eps}" + (f",note={note}]" if note else "]")
        store.put_cell(run_id, attack=label, protocol="adaptive", name=attack, params={"note": note}, norm="Linf",
                       eps=eps, threat=f"Linf eps={eps}", flags=clean & (rng.random(n) < 0.6), seconds=1.0, extra={})


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory) -> Path:
    """A results database whose every text field holds a hostile string, in a folder named like H2's --out."""
    out = tmp_path_factory.mktemp("hostile") / OUT_NAME
    store = Store(out)
    rng = np.random.default_rng(0)
    _put_run(store, "0" * 64, "pgd_at", {}, data=HOSTILE[3])  # the base; its config's data field is H3's
    # `pgd+eot` at three budgets on some rows: the accuracy-vs-eps figure (L1), hostile names in its legend
    _put_cells(store, "0" * 64, rng, budgets=(0.05, 0.1, 0.2))
    for i, s in enumerate(HOSTILE):
        run_id = (RUN_ID_BREAKOUT if i == 0 else f"{i:02d}{s[:8]}").ljust(64, str(i % 10))
        # two configurations of each hostile defense, told apart by a free-text parameter (H1)
        defense = s if i % 2 else "free_text"
        _put_run(store, run_id, defense, {"note": s}, command=f"bench run --defense x --attack-param pgd.note={s}",
                 code_version=s, meta=META)
        _put_cells(store, run_id, rng, note=s, budgets=(0.05, 0.1, 0.2) if i in (1, 7) else (0.1,))
        store.put_checks(run_id, [(f"check {s}", "warn", f"detail {s}", f"⚠ {s}")])
        store.put_requests(run_id, [(f"pgd+eot[note={s}]", "adaptive", "Linf eps=0.1"),
                                    (s, "adaptive", "Linf eps=0.1")])
    # a second board whose dataset name is no file name (a path, markup)
    _put_run(store, "f" * 64, "pgd_at", {}, dataset=HOSTILE_DATASET)
    _put_cells(store, "f" * 64, rng)
    store.close()
    return out


@pytest.fixture(scope="module")
def hostile_boards(hostile_results, tmp_path_factory) -> dict[str, list[Path]]:
    """`bench leaderboard --out <hostile folder> --format md|html|latex` (in-process)."""
    from bench.cli import main

    dest = tmp_path_factory.mktemp("boards")
    written = {}
    for fmt in ("md", "html", "latex"):
        try:
            main(["leaderboard", "--out", str(hostile_results), "--dest", str(dest), "--format", fmt])
        except SystemExit as exc:
            assert exc.code == 0
        written[fmt] = sorted(dest.glob({"md": "*.md", "html": "*.html", "latex": "*.tex"}[fmt]))
    return written


def _main_board(paths: list[Path]) -> Path:
    return next(p for p in paths if p.name.startswith("digits-"))


def test_hostile_strings_are_text_in_the_html_page(hostile_boards):
    """H1 (a javascript: link in a parameter), H2 (markup in --out), H3 (runs.config, run_id[:10] in an id)."""
    text = _main_board(hostile_boards["html"]).read_text()
    page = assert_safe_html(text, shown=HOSTILE + [OUT_NAME])
    ids = {attrs["id"] for _, attrs in page.elements if "id" in attrs}
    assert not any(RUN_ID_BREAKOUT in i for i in ids)
    assert f"<code>{webpage.escape(RUN_ID_BREAKOUT)}</code>" in text  # shown, escaped, in the run's details
    assert "onerror=alert(8)" in _flat(" ".join(page.text))  # the --out path, as text
    # the links a hostile string spells in markdown are shown as text, never followed
    assert not [a for tag, a in page.elements if tag == "a" and "javascript" in a.get("href", "").lower()]
    (other,) = [p for p in hostile_boards["html"] if not p.name.startswith("digits-")]
    assert_safe_html(other.read_text(), shown=[HOSTILE_DATASET])


def test_hostile_strings_keep_the_markdown_tables_and_show_as_text(hostile_boards):
    """MD1: '|' and newlines in a defense, parameter or attack name add no column and split no row; no tag
    from a name reaches the .md."""
    text = _main_board(hostile_boards["md"]).read_text()
    assert_safe_markdown(text, shown=HOSTILE)
    assert "<script" not in text.lower() and "<img" not in text.lower() and "<svg" not in text.lower()
    regenerate = next(ln for ln in text.split("\n") if ln.startswith("- Regenerate:"))
    assert "&lt;img src=x onerror=alert(8)&gt;" in regenerate  # H2: the whole path on the line, as text
    assert len(text.split("| Rank", 1)[1].split("\n\n", 1)[0].split("\n")) == 2 + 1 + len(HOSTILE)  # one line a row


def test_hostile_strings_compile_in_latex_as_they_are(hostile_boards, tmp_path):
    """LaTeX specials, markdown links and unicode: escaped, never dropped ('[x](y)' stays '[x](y)'), and the
    file compiles."""
    tex = _main_board(hostile_boards["latex"]).read_text()
    assert_safe_latex(tex, shown=[s for s in HOSTILE if len(s) < 100])
    assert untex("{[}open paper{]}(javascript:alert\\%28document.domain\\%29)") in untex(tex)
    compile_latex(tex, tmp_path)


def test_a_name_that_is_no_file_name_gets_a_safe_one_not_a_refused_board(hostile_results, hostile_boards):
    """L1: an attack named `pgd+eot` at three budgets draws its figure under a safe name; a dataset named like a
    path gets a leaderboard file of its own inside --dest, each name kept apart by a digest."""
    mds = hostile_boards["md"]
    assert len(mds) == 2 and all(p.parent == mds[0].parent for p in mds)
    dest = mds[0].parent
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", p.name) for p in dest.iterdir())
    main = _main_board(mds).read_text()
    (figure,) = re.findall(r"\]\((digits-tiny_cnn-smoke-eps-pgd_eot-[0-9a-f]{8}\.png)\)", main)
    assert (dest / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Robust accuracy vs ε (pgd+eot)" in main
    html_page = _main_board(hostile_boards["html"]).read_text()
    assert html_page.count("data:image/png;base64,") == 1
    # one name, one file; two names, two files
    from bench.api import ReportContext

    rc = ReportContext(configs=[], dataset="d", arch="a", preset="p", dest=dest, stem="s")
    names = ["pgd+eot", "pgd eot", "pgd/eot", "../../x", "", ".x", "x" * 300]
    paths = [rc.figure(n) for n in names]
    assert len(set(paths)) == len(names) and paths[0] == rc.figure("pgd+eot")
    assert all(p.parent == dest and len(p.name) < 255 for p in paths)
    assert rc.figure("eps-pgd10") == dest / "s-eps-pgd10.png"  # a safe name stays itself


def test_meta_link_accepts_only_http_addresses(bench, tmp_path):
    """`--meta link=javascript:...` is refused with one line before anything runs; http(s) passes."""
    from bench.config import validate_meta

    for bad in ("javascript:alert(1)", "JAVASCRIPT:x", "data:text/html,x", "//evil.example", "ftp://x", " http://x",
                "http://", "file:///etc/passwd"):
        with pytest.raises(BenchError, match="must be an http:// or https:// address"):
            validate_meta({"link": bad})
    with pytest.raises(BenchError, match="link:Linf must be an http"):
        validate_meta({"link:Linf": "javascript:x"})
    assert validate_meta({"link": "https://example.org/p", "link:L2": "HTTP://example.org"})
    res = bench("run", "--preset", "smoke", "--defense", "standard", "--attacks", "fgsm", "--meta",
                "link=javascript:alert(1)", "--out", tmp_path / "r", "--quiet")
    assert res.code == 2 and res.err.count("\n") == 1 and "bench: error: --meta link must be an http" in res.err
    assert not (tmp_path / "r").exists()


def test_links_are_followed_only_to_http_relative_and_in_page_addresses():
    followed = ["http://x.org", "HTTPS://x.org/a?b#c", "#runs", "figure.png", "sub/page.html", "?q=1"]
    refused = ["javascript:alert(1)", "JaVaScRiPt:x", "vbscript:x", "data:text/html,x", "file:///etc/passwd",
               "//evil.example/x", "java\tscript:x", " javascript:x", "\x01javascript:x", "javascript\n:x",
               "\\\\evil\\x", "mailto:a@b.c"]
    assert all(markdown_reader.followable(t) for t in followed)
    assert not [t for t in refused if markdown_reader.followable(t)]
    for target in refused:
        out = webpage.inline(f"[label]({target})".replace("\n", " "))
        assert "<a" not in out and "label" in out
    assert webpage.inline("[paper](https://x.org) `a<b` **b** *e* \\[x\\](y)") == \
        '<a href="https://x.org">paper</a> <code>a&lt;b</code> <strong>b</strong> <em>e</em> [x](y)'
    # the raw HTML of the leaderboard's own markdown passes; any other line starting with '<' is text
    own = ['<details><summary>Every check</summary>', "</details>", '<a id="run-abc"></a>']
    assert webpage.markdown_html(own, {}) == own
    assert webpage.markdown_html(["<img src=x onerror=alert(1)>"], {}) == \
        ["<p>&lt;img src=x onerror=alert(1)&gt;</p>"]


def test_escapes_read_back_as_the_text_they_escape():
    for s in HOSTILE:
        flat = markdown_reader.one_line(s)
        assert markdown_reader.plain(markdown_reader.escape(s)) == flat
        assert markdown_reader.plain(markdown_reader.code(s)) == flat
        assert "\n" not in markdown_reader.escape(s) and "<" not in markdown_reader.escape(s)
        assert untex(latex.escape(s)) == flat.replace("\u00a0", " ")
    # LaTeX never drops a link's address silently: a name's '[x](y)' is text; a report's link keeps its address
    assert untex(latex.escape("[x](y)")) == "[x](y)" and latex.text("[x](y)") == "x (y)"
    assert latex.text("[⚠ flag](#checks-a)") == "(!) flag" and untex(latex.text("\\[x\\](y)")) == "[x](y)"
    assert markdown_reader.code("bench run --defense rift --param k=1") == "`bench run --defense rift --param k=1`"
    assert markdown_reader.escape("rift_bn k=1") == "rift_bn k=1"  # what is no markup stays as it is
    assert markdown_reader.anchor("run-0123456789") == "run-0123456789"
    assert markdown_reader.anchor('run-"><svg onl') != markdown_reader.anchor("run-'><svg onl")


# ----------------------------------------------------------------------------------------------------
# property: any string, through every text field of a board, into the three formats


def _config(defense: str, params: dict, run_id: str, label: str, check: str, command: str, data: str, seed: int):
    rng = np.random.default_rng(seed)
    n = 30
    clean = rng.random(n) < 0.8
    cells = {(label, "adaptive"): {"name": label, "protocol": "adaptive", "eps": 0.1, "norm": "Linf",
                                   "threat": "Linf eps=0.1", "flags": clean & (rng.random(n) < 0.5),
                                   "correct": 1, "n": n, "seconds": 1.0}}
    run = {"run_id": run_id, "seed": 0, "batch_dependent": 0, "command": command, "code_version": data,
           "config": {"data": data, "preset": {"eps": 0.1}}, "info": {}, "dataset": "digits", "arch": ARCH,
           "preset": "smoke"}
    checks = [{"name": check, "status": "warn", "detail": check, "flag": f"⚠ {check}"}]
    missing = [{"attack": check, "protocol": "adaptive", "threat": "Linf eps=0.1", "error": None}]
    return Config(defense, params, [Run(run, clean, cells, checks, missing)])


# arbitrary text and pieces of markup (a random character is rarely '<' or '|'), in any order
PIECES = ["<", ">", "|", "`", "\\", "[", "]", "](", "(", ")", "javascript:", "<img src=x onerror=alert(1)>", "\n",
          "\r", "$", "&", "&lt;", "*", "**", "_", "#", "- ", "1. ", "{", "}", "%", "^", "~", "'", "''", '"', "--", " "]
ANY_TEXT = st.lists(st.sampled_from(PIECES) | st.text(max_size=6), min_size=1, max_size=8).map("".join)


@settings(derandomize=True, max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ANY_TEXT, min_size=2, max_size=4))
def test_any_string_through_any_field_is_text_in_every_format(tmp_path_factory, strings):
    configs = [_config("pgd_at", {}, "0" * 64, "pgd10", "budget", "bench run", "f1301c", 0)]
    for i, s in enumerate(strings):
        other = strings[(i + 1) % len(strings)]
        configs.append(_config(s, {"note": other, "i": i}, (s + str(i)).ljust(64, "0"), f"{other}[x={s}]", s,
                               f"bench run {s}", other, i + 1))
    dest = tmp_path_factory.mktemp("prop")
    board = leaderboard.build(configs, "digits", ARCH, "smoke", dest, strings[0], "abc1234", "digits-x-smoke",
                              figure_dir=dest)
    shown = [s for s in strings if s.strip()]
    assert_safe_markdown(leaderboard.markdown(board), shown)
    assert_safe_html(webpage.page(board), shown)
    assert_safe_latex(latex.document(board), shown)


# lines a report plugin might write, markup and all
MARKDOWN_LINES = ["| a | b |", "|---|---|", "| <img src=x onerror=alert(1)> | [x](javascript:y) |", "# h <b>",
                  "- [l](JavaScript:x) `c` **b**", "![c](javascript:x)", "<details>", '<a id="x" onclick="y"></a>',
                  "<script>alert(1)</script>", "<summary>s</summary>", ""]


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(MARKDOWN_LINES) | ANY_TEXT, max_size=6))
def test_any_markdown_becomes_html_without_markup_of_its_own(lines):
    """A report plugin's markdown, whatever it holds, becomes the page's own tags only: code, links that may
    be followed, emphasis, tables, lists, headings, the folded details, figures not drawn."""
    out = "\n".join(webpage.markdown_html(lines, {}))
    page = _Page(out)
    for tag, attrs in page.elements:
        assert tag in PAGE_TAGS - {"script", "style", "meta", "link", "img"}, (tag, attrs)
        assert set(attrs) <= {"href", "id"}, (tag, attrs)
        if "href" in attrs:  # http(s), or relative without a scheme (as a browser reads one)
            href = attrs["href"]
            assert re.match(r"https?://", href, re.IGNORECASE) or not (
                re.match(r"[\x00-\x20]*[A-Za-z][A-Za-z0-9+.\t\n-]*:", href) or href.startswith(("//", "\\"))), attrs
        if "id" in attrs:
            assert re.fullmatch(r"[\w-]*", attrs["id"]), attrs
    assert not page.scripts


def test_hostile_page_in_a_headless_browser(hostile_boards, tmp_path):
    """The corpus page in chromium: no dialog, no console error (a script the policy refused would log one),
    the policy present, and sorting and filtering work on hostile defense names."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from test_webpage import _browser

    browser = _browser()
    try:
        browser.get(_main_board(hostile_boards["html"]).as_uri())
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018 -- an alert() that ran would be open now
        assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR", "WARNING")] == []
        policy = browser.find_element(By.CSS_SELECTOR, 'meta[http-equiv="Content-Security-Policy"]')
        assert "default-src 'none'" in policy.get_attribute("content")
        assert browser.execute_script("return document.querySelectorAll('svg, iframe, object, embed').length") == 0
        table = browser.find_element(By.ID, "leaderboard")
        rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
        Select(browser.find_element(By.ID, "defense-filter")).select_by_value(HOSTILE[1])
        shown = [r for r in rows if r.is_displayed()]
        assert len(shown) == 1 and HOSTILE[1] in shown[0].text
        assert browser.find_element(By.ID, "row-count").text == f"1 of {len(rows)} rows"
        table.find_elements(By.CSS_SELECTOR, "thead th")[1].click()  # sort by defense name
        assert table.find_elements(By.CSS_SELECTOR, "thead th")[1].get_attribute("aria-sort") == "ascending"
        # every link on the page leads within it
        for link in browser.find_elements(By.CSS_SELECTOR, "a[href]"):
            assert link.get_attribute("href").split("#")[0] in (browser.current_url.split("#")[0], "")
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018
        assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")] == []
        # the policy itself: markup slipped into the page (as if an escape were missed) runs nothing
        injected = tmp_path / "injected.html"
        injected.write_text(_main_board(hostile_boards["html"]).read_text().replace(
            "<body>", '<body><script>document.title = "ran";</script><img src=x onerror="document.title = \'ran\'">'
                      '<a id="js" href="javascript:document.title = \'ran\'">x</a>', 1))
        browser.get(injected.as_uri())
        browser.find_element(By.ID, "js").click()
        assert browser.title != "ran" and browser.find_element(By.ID, "row-count").text  # its own script ran
        refused = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
        for what in ("inline script", "inline event handler", "JavaScript URL", "Loading the image"):
            assert any(what in m for m in refused), (what, refused)
    finally:
        browser.quit()


# ----------------------------------------------------------------------------------------------------
# the report plugins (bench.reports): names from runs, parameters and attacks into their markdown (MD1)

# what a name may hold that a markdown table or a viewer would read as markup (no '$': matplotlib's math)
HOSTILE_SUFFIX = " |a|b|\n<script>alert(1)</script> [x](javascript:alert(2)) <img src=x onerror=alert(3)> *e* _u_"


def _report_run(defense: str, params: dict, cells: dict, rng, *, info=None, missing=(), batch_dependent=0,
                surrogates=None, run_id="") -> Config:
    """One stored run of `defense`: `cells` maps (label, protocol) to its threat; flags drawn from `rng`."""
    n = 40
    clean = rng.random(n) < 0.8
    stored = {key: {"name": key[0].partition("[")[0], "protocol": key[1], "eps": 0.1, "norm": "Linf", "threat": threat,
                    "flags": clean & (rng.random(n) < 0.6), "correct": 1, "n": n, "seconds": 1.0}
              for key, threat in cells.items()}
    run = {"run_id": (run_id or f"{defense}-{len(params)}-{rng.integers(1 << 30)}").ljust(64, "0"), "seed": 0,
           "batch_dependent": batch_dependent, "command": f"bench run --defense {defense}", "code_version": "abc1234",
           "params": params, "info": {**(info or {}), "bench": {"surrogates": surrogates or {}}},
           "config": {"data": "f1301c", "defense": defense, "params": sorted(params.items(), key=str),
                      "preset": {"eps": 0.1, "ft_epochs": 2, "ft_lr": 0.01}},
           "dataset": "digits", "arch": ARCH, "preset": "smoke"}
    lacking = [{"attack": a, "protocol": "adaptive", "threat": threat, "error": None} for a, threat in missing]
    return Config(defense, params, [Run(run, clean, stored, [], lacking)])


def report_configs(name) -> list[Config]:
    """The fewest configurations that make each built-in report write every table, list and figure caption
    it has: RiFT's table 1, chosen modules, MRC ranking and BN-output KDE caption; the fine-tuning curves;
    Walter et al.'s table with both marks; the norm-shaping grids and table III. Every name a report shows
    (attack labels, threats, module names, splits, parameter values, surrogates) is `name(ordinary name)`."""
    rng = np.random.default_rng(0)
    linf, wide = name("Linf eps=0.1"), name("Linf eps=0.2")
    other = name("fgsm")  # an attack label, run on some rows only: the marks name it
    bn, conv, head = name("layer1.0.bn1"), name("layer1.0.conv1"), name("linear")
    candidates = [{"module": m, "order": i, "kind": kind, "mrc": 0.01 * (i + 1), "max_delta_ratio": 0.05 + 0.02 * i}
                  for i, (m, kind) in enumerate([(conv, "conv"), (bn, "bn"), (head, "linear")])]
    outputs = [0.1 * i for i in range(30)]  # the same outputs everywhere: the KDE caption explains why

    def rift_info(chosen, alpha):
        curve = [{"alpha": a / 10, "clean": 0.7 + a / 100, "robust": 0.4 - a / 200} for a in range(0, 11, 5)]
        return {"alpha_curve": curve, "alpha": alpha, "chosen": chosen, "candidates": candidates,
                "base_selection": {"robust": 0.41}, "selection": name("val"),
                "bn_outputs": {"base": {bn: outputs}, "final": {bn: outputs}}, "finetune": {"history": [{}, {}]}}

    attacked = {("pgd10", "adaptive"): linf, (other, "adaptive"): linf, ("pgd10[eps=0.2]", "adaptive"): wide}
    base = _report_run("pgd_at", {}, {**attacked, ("autoattack", "adaptive"): linf}, rng, run_id="pgd_at")
    configs = [
        base,
        _report_run("rift", {"k": 1}, {("pgd10", "adaptive"): linf, ("autoattack", "adaptive"): linf}, rng,
                    info=rift_info([conv], 0.5)),
        _report_run("rift_bn", {"k": 1, "lr": name(0.001)}, {("pgd10", "adaptive"): linf}, rng,
                    info=rift_info([bn], 0.5)),
        _report_run("rift_bn", {"k": 1, "mrc_ascent": "normalized", "mrc_eps": 0.1}, {("pgd10", "adaptive"): linf},
                    rng, info=rift_info([head], 1.0)),
    ]
    for group in ("bn", "conv"):
        curve = [{"epoch": e, "clean": 0.7 + e / 100, "pgd10": 0.4 + e / 100} for e in range(3)]
        configs.append(_report_run(f"ft_{group}", {}, {("pgd10", "adaptive"): linf}, rng,
                                   info={"curve": curve, "curve_split": name("val"), "trainable_parameters": 1234}))
    configs += [_report_run("standard", {}, attacked, rng),
                _report_run("bn_stats", {}, {("pgd10", "adaptive"): linf}, rng),  # † without `other`
                _report_run("bn_params", {"extra": ["logits", name("conv1")]}, {("pgd10", "adaptive"): linf}, rng,
                            missing=[(other, linf)])]  # ‡ `other` missing
    surrogate = "paper:" + name("test_batch")
    for train in (1, 3):
        for infer in (0, 3):
            cells = {("pgd10", "adaptive"): linf, ("pgd10", "paper"): linf, ("pgd10", surrogate): linf}
            if train == infer == 3:
                cells.update({(other, "paper"): linf, (other, "adaptive"): linf, ("shaping", "adaptive"): linf})
            configs.append(_report_run("norm_shaping", {"train_ratio": train, "infer_ratio": infer,
                                                        "note_ratio": name("a")}, cells, rng,
                                       batch_dependent=1, surrogates={name("eval"): "the network in eval mode"}))
    return configs


REPORT_SECTIONS = {  # each built-in report's section, and the names (`report_configs`) it shows
    "## Fragile features and BN": ["fgsm", "conv1", "Linf eps=0.1", "Linf eps=0.2"],
    "## Layer-type fine-tuning": ["val"],
    "## Norm shaping": ["eval", "test_batch", "fgsm", "a"],
    "## RiFT top-k": ["layer1.0.conv1", "layer1.0.bn1", "linear", "val", 0.001],
}


def _hostile(value) -> str:
    return f"{value}{HOSTILE_SUFFIX}"


@pytest.fixture(scope="module")
def report_boards(tmp_path_factory) -> dict[str, tuple]:
    """The board of `report_configs` with ordinary names and with hostile ones: (board, its markdown)."""
    out = {}
    for kind, name in (("ordinary", lambda v: v), ("hostile", _hostile)):
        dest = tmp_path_factory.mktemp(kind)
        board = leaderboard.build(report_configs(name), "digits", ARCH, "smoke", dest, "results", "abc1234",
                                  "digits-tiny_cnn-smoke", figure_dir=dest)
        out[kind] = board, leaderboard.markdown(board)
    return out


def _section(text: str, heading: str) -> str:
    start = text.index(heading + " ") if heading + " " in text else text.index(heading + "\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


@pytest.mark.parametrize("heading", list(REPORT_SECTIONS))
def test_report_plugins_show_hostile_names_as_text_in_their_markdown(report_boards, heading):
    """MD1 in the report plugins: a '|', a newline, a tag or a javascript: link in an attack label, a threat,
    a parameter value, a surrogate or a module name adds no column, splits no row or line, and reaches the
    .md only as text; each name is shown as it is. The sections keep the shape they have with ordinary names."""
    ordinary, hostile = (_section(text, heading) for _, text in (report_boards["ordinary"], report_boards["hostile"]))
    assert table_rows(ordinary) and "failed" not in " ".join(re.findall(r"## Report .*", report_boards["hostile"][1]))
    assert_safe_markdown(hostile, shown=[_hostile(v) for v in REPORT_SECTIONS[heading]])
    assert table_rows(hostile) == table_rows(ordinary)  # as many tables, rows and columns
    assert len(hostile.split("\n")) == len(ordinary.split("\n"))
    assert not re.search(r"<(script|img)|(?<!\\)\]\(javascript:", hostile, re.IGNORECASE)  # '\]' is text
    for value in REPORT_SECTIONS[heading]:  # the ordinary name itself is written as it was, unescaped
        assert str(value) in ordinary


def test_report_plugins_hostile_names_are_text_on_the_page_and_in_latex(report_boards):
    """The same board as a web page and a LaTeX file: no element or link from a name, every table as wide as
    its header."""
    board, _ = report_boards["hostile"]
    shown = [_hostile(v) for names in REPORT_SECTIONS.values() for v in names]
    assert_safe_html(webpage.page(board), shown)
    assert_safe_latex(latex.document(board), shown)


def test_report_tables_escape_plain_cells_and_keep_markdown():
    """`rc.table`: plain text escaped (a number as it is), `Markdown` kept, a list of pieces joined, each by
    its kind; `markdown_text` leaves markdown alone, so escaping twice changes nothing."""
    from bench.api import Markdown, ReportContext, markdown_code, markdown_text

    mark = Markdown(" † without a\\|b")
    text = ReportContext.table(["k|v", Markdown("a \\ b")], [["x|y\nz", [f"{12.5:.1f}", mark]], [3, "-1.5"]])
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in text.split("\n")]
    assert cells[0] == ["k\\|v", "a \\ b"] and cells[2:] == [["x\\|y z", "12.5 † without a\\|b"], ["3", "-1.5"]]
    assert markdown_text("<b>|1. x") == "&lt;b&gt;\\|1. x" and markdown_text("1. x") == "1\\. x"
    assert markdown_text(0.001) == "0.001" and markdown_text(markdown_text("a|b")) == "a\\|b"
    assert isinstance(markdown_text("a"), Markdown) and markdown_code("eval") == "`eval`"
    assert markdown_code("a|b") == "a\\|b"
