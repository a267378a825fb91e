"""The README stays true: CI runs its install and test commands verbatim, and its main command works."""

from __future__ import annotations

import re
import shlex

from conftest import REPO


def _block_after(heading: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip()]


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    install, test = _block_after("Install"), _block_after("Test")
    assert len(install) == 1 and len(test) == 1
    assert install[0] in ci and test[0] in ci
    assert "torch==2.13.0" in install[0] and ci.index(install[0]) < ci.index(test[0])


def test_readme_main_command_runs(bench, out_dir):
    (main_cmd,) = _block_after("Run")
    args = shlex.split(main_cmd)
    assert args[:2] == ["bench", "run"]
    # The README command exactly, at the smoke scale and into a temporary results directory.
    res = bench(*args[1:], "--preset", "smoke", "--out", out_dir, "--quiet")
    assert res.code == 0, res.err
    assert "worst case" in res.out
