"""`bench leaderboard --format html` in a real headless browser (Debian's chromium through selenium): the
page loads without console errors, sorts, filters, and asks nothing of the network."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench import leaderboard, webpage
from bench.leaderboard import Config, Run

THREAT = "Linf eps=0.1"


def _config(defense: str, params: dict, clean: float, worst: float, seed_offset: int, *, checks=(), missing=()):
    """A configuration with one run of 200 samples: `clean` and `worst` are its accuracies; pgd10 at three
    budgets (a figure), fgsm at the threat model's."""
    rng = np.random.default_rng(seed_offset)
    n = 200
    clean_flags = np.zeros(n, bool)
    clean_flags[rng.permutation(n)[: int(clean * n)]] = True
    worst_flags = clean_flags.copy()
    worst_flags[np.flatnonzero(clean_flags)[int(worst * n):]] = False

    def cell(name, eps, flags):
        threat = f"Linf eps={eps}"
        return {"name": name, "protocol": "adaptive", "eps": eps, "norm": "Linf", "threat": threat, "flags": flags,
                "correct": int(flags.sum()), "n": n, "seconds": 1.0}

    cells = {("pgd10", "adaptive"): cell("pgd10", 0.1, worst_flags),
             ("fgsm", "adaptive"): cell("fgsm", 0.1, worst_flags | (clean_flags & (rng.random(n) < 0.3))),
             ("pgd10[eps=0.05]", "adaptive"): cell("pgd10", 0.05, clean_flags & (rng.random(n) < 0.8)),
             ("pgd10[eps=0.2]", "adaptive"): cell("pgd10", 0.2, worst_flags & (rng.random(n) < 0.4))}
    run_id = f"{defense}{seed_offset:02d}".ljust(64, "0")
    run = {"run_id": run_id, "seed": 0, "batch_dependent": 0, "command": f"bench run --defense {defense}",
           "code_version": "abc1234", "config": {"data": "f1301c", "preset": {"eps": 0.1}}, "info": {},
           "dataset": "digits", "arch": "tiny_cnn", "preset": "smoke"}
    lacking = [{"attack": a, "protocol": "adaptive", "threat": THREAT, "error": None} for a in missing]
    return Config(defense, params, [Run(run, clean_flags, cells, list(checks), lacking)])


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    """An HTML leaderboard of seven rows of four defenses (one with a failed check, one incomplete)."""
    check = {"name": "budget", "status": "fail", "detail": "3 examples outside eps", "flag": "⚠ outside the threat model"}
    configs = [_config("pgd_at", {}, 0.80, 0.40, 1), _config("standard", {}, 0.95, 0.02, 2),
               _config("rift", {"k": 1}, 0.79, 0.42, 3), _config("rift", {"k": 2}, 0.78, 0.30, 4, checks=[check]),
               _config("rift_bn", {"k": 1}, 0.81, 0.41, 5), _config("rift_bn", {"k": 2}, 0.70, 0.10, 6),
               _config("trades", {}, 0.75, 0.45, 7, missing=["autoattack"])]
    dest = tmp_path_factory.mktemp("html")
    figures = dest / "figures"
    figures.mkdir()
    board = leaderboard.build(configs, "digits", "tiny_cnn", "smoke", dest, "results", "abc1234",
                              "digits-tiny_cnn-smoke", figure_dir=figures)
    path = dest / "board.html"
    path.write_text(webpage.page(board))
    return path


def test_page_is_self_contained(page):
    text = page.read_text()
    # every src and href is inline data or an anchor on the page: nothing to fetch from a network or a CDN
    refs = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), [r for r in refs if not r.startswith(("data:", "#"))]
    assert "data:image/png;base64," in text  # the accuracy-vs-eps figure, inlined
    assert 'id="run-' in text and "3 examples outside eps" in text and "bench run --defense trades" in text


def _browser():
    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        reason = "no chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; .ci/run installs them")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver: selenium then never tries to download one
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_page_in_a_headless_browser(page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    shots = Path(os.environ.get("BENCH_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    browser = _browser()
    try:
        browser.get(page.as_uri())
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        table = browser.find_element(By.ID, "leaderboard")
        headers = [th.text.rstrip(" ↕▲▼") for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
        worst = next(i for i, h in enumerate(headers) if h.startswith("Worst"))
        defense = headers.index("Defense")

        def column(i):
            return [(row.find_elements(By.TAG_NAME, "td")[i].get_attribute("data-sort"),
                     row.find_elements(By.TAG_NAME, "td")[i].text)
                    for row in table.find_elements(By.CSS_SELECTOR, "tbody tr") if row.is_displayed()]

        browser.save_screenshot(str(shots / "leaderboard-before-sort.png"))
        th = table.find_elements(By.CSS_SELECTOR, "thead th")[worst]
        th.click()
        values = [float(v) for v, _ in column(worst)]
        assert values == sorted(values, reverse=True) and th.get_attribute("aria-sort") == "descending"
        assert [t for _, t in column(defense)][0] == "trades"  # 45 %, ranked below others by the test
        th.click()
        values = [float(v) for v, _ in column(worst)]
        assert values == sorted(values) and th.get_attribute("aria-sort") == "ascending"
        assert [t for _, t in column(defense)][0] == "standard"
        browser.save_screenshot(str(shots / "leaderboard-sorted-by-worst.png"))

        Select(browser.find_element(By.ID, "defense-filter")).select_by_value("rift")
        shown = [t for _, t in column(defense)]
        assert sorted(shown) == ["rift k=1", "rift k=2"]
        rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
        assert sum(not r.is_displayed() for r in rows) == len(rows) - 2
        assert browser.find_element(By.ID, "row-count").text == f"2 of {len(rows)} rows"
        browser.save_screenshot(str(shots / "leaderboard-filtered.png"))

        # the Run link opens that run's folded details: its checks with their detail
        rift2 = next(r for r in rows if r.is_displayed() and "k=2" in r.text)
        rift2.find_elements(By.TAG_NAME, "td")[headers.index("Run")].find_element(By.TAG_NAME, "a").click()
        details = browser.find_element(By.ID, "run-" + rift2.find_elements(By.TAG_NAME, "td")[headers.index("Run")].text)
        assert details.get_attribute("open") is not None and "3 examples outside eps" in details.text
        assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")] == []
        assert (shots / "leaderboard-sorted-by-worst.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        browser.quit()
