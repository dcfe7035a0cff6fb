"""What a new user meets first: the README's two commands exist, CI runs the same test command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_names_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start")[1].split("##")[0]
    commands = re.findall(r"^(\./scripts/\w+)", quick_start, flags=re.M)
    assert commands == ["./scripts/serve", "./scripts/check"]
    for command in commands:
        assert os.access(ROOT / command, os.X_OK), f"{command} is not executable"
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().splitlines()[-1] == "exec ./scripts/check"


def test_no_top_level_core_or_plugins_package_is_installed(tmp_path: Path) -> None:
    # a fresh interpreter outside the checkout sees only what is installed
    probe = "import importlib.util as u; print([n for n in ('core', 'plugins', 'contrib') if u.find_spec(n)])"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
    ok = subprocess.run([sys.executable, "-c", "import llmgateway.core.app"], cwd=tmp_path, env=env, check=False)
    assert ok.returncode == 0


def test_docs_linked_from_the_readme_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", readme):
        assert (ROOT / link).exists(), f"README links to missing {link}"
