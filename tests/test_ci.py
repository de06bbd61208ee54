"""What a fresh clone gets: CI runs the README's test command, and a charrnn process on a fresh
install prints nothing on stderr but its own lines (no warnings from a missing dependency)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def readme_test_command() -> str:
    """The README's one-line 'install and run the tests' command (fresh venv, install, pytest)."""
    found = [line.strip() for line in (REPO / "README.md").read_text().splitlines()
             if line.startswith("python3 -m venv ") and "pytest" in line]
    assert len(found) == 1, f"expected one test command in README.md, found {found}"
    return found[0]


def ci_steps() -> list[str]:
    """The commands .ci/run executes, in order, with its temp venv written back as the README's .venv."""
    steps = []
    for line in (REPO / ".ci" / "run").read_text().splitlines():
        line = line.strip()
        if line.startswith("run "):
            line = line[len("run "):]
        elif not line.startswith(". "):
            continue
        line = line.replace('"$VENV"', ".venv").replace(' "$@"', "").split(" || ")[0]
        steps.append(line)
    return steps


def test_ci_runs_the_readme_test_command():
    """Every step of the README's command, in the same order and nothing else: a dependency the
    README's users need is one CI needs too, and a step CI adds would hide its lack from them."""
    assert ci_steps() == readme_test_command().split(" && ")


def test_ci_uses_a_fresh_venv_and_fails_on_no_tests():
    """A venv of its own, never the system's packages, and pytest's exit 5 (no tests ran) is a failure."""
    script = (REPO / ".ci" / "run").read_text()
    assert "--system-site-packages" not in script
    assert re.search(r'VENV="\$tmp/venv"', script) and "mktemp -d" in script and "trap 'rm -rf" in script
    assert re.search(r'if \[ "\$status" -eq 5 \]; then\n.*\n\s+exit 1', script)


@pytest.mark.parametrize("args", [
    ["eval", "missing.pt", "missing.txt"],
    ["sample", "no-such-run"],
    ["train", "no-such-corpus.txt", "--steps", "1"],
])
def test_a_failing_command_prints_exactly_one_line(args, tmp_path):
    """A real process, as a user starts it: its stderr is the one error line and nothing else (on a
    torch install without numpy, torch's own 'Failed to initialize NumPy' warning came first)."""
    r = subprocess.run([sys.executable, "-m", "charrnn", *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert r.stdout == ""
