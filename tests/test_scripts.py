"""scripts/test and scripts/demo, the README's two commands, on a machine that lacks things.

The machine is simulated with a PATH holding only what each case needs: the commands the
scripts use, and stand-ins for `id` (root or not) and `apt-get` (which records its arguments).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the scripts themselves run, beside the programs they look for.
_TOOLS = ("bash", "dirname", "cat", "sh")


def machine(tmp_path: Path, *, uid: int, have: tuple[str, ...] = ()) -> tuple[dict[str, str], Path]:
    """An environment whose PATH has the scripts' tools, `have`, a fake `id` and a fake `apt-get`;
    and the file where apt-get writes its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in _TOOLS:
        for folder in ("/usr/bin", "/bin"):
            if Path(folder, tool).exists():
                (bin_dir / tool).symlink_to(Path(folder, tool))
                break
    for program in have:
        stub(bin_dir, program, "exit 0")
    stub(bin_dir, "id", f"echo {uid}")
    calls = tmp_path / "apt-get.calls"
    stub(bin_dir, "apt-get", f'echo "$@" >> {calls}')
    # A Python that can make virtualenvs but stops the script there (exit 42): what comes after
    # (pip, pytest) is the suite itself.
    fake_python = stub(bin_dir, "fake-python", 'case "$*" in *ensurepip*) exit 0;; *) exit 42;; esac')
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "PYTHON": str(fake_python),
           "COMPOSER_VENV": str(tmp_path / "venv")}
    return env, calls


def stub(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "scripts" / script)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def test_not_root_prints_the_exact_install_line_and_runs_nothing(tmp_path: Path) -> None:
    env, calls = machine(tmp_path, uid=1000)
    done = run("test", env)
    assert done.returncode == 3, done.stderr
    assert "  sudo apt-get install -y chromium prometheus openssl\n" in done.stderr
    assert not calls.exists() and not (tmp_path / "venv").exists()  # nothing half-ran


def test_not_root_names_only_what_is_missing(tmp_path: Path) -> None:
    env, _ = machine(tmp_path, uid=1000, have=("chromium", "openssl", "promtool"))
    done = run("test", env)
    assert done.returncode == 3
    assert "  sudo apt-get install -y prometheus\n" in done.stderr  # promtool alone is not enough


def test_root_installs_what_is_missing_then_goes_on(tmp_path: Path) -> None:
    env, calls = machine(tmp_path, uid=0, have=("openssl",))
    done = run("test", env)
    assert calls.read_text().split("\n")[0] == "install -y -q chromium prometheus"
    assert done.returncode == 42, done.stderr  # it went on to make the virtualenv


def test_nothing_missing_goes_straight_to_the_virtualenv(tmp_path: Path) -> None:
    env, calls = machine(tmp_path, uid=1000, have=("chromium", "openssl", "promtool", "prometheus"))
    done = run("test", env)
    assert done.returncode == 42 and not calls.exists(), done.stderr


def test_demo_without_venv_support_says_what_to_install(tmp_path: Path) -> None:
    env, _ = machine(tmp_path, uid=1000)
    stub(tmp_path / "bin", "fake-python", "exit 1")  # no ensurepip: Debian without python3-venv
    done = run("demo", env)
    assert done.returncode == 3 and "sudo apt-get install -y python3-venv" in done.stderr


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test          # the test suite" in readme
    assert ci.rstrip().endswith("exec scripts/test")
    assert "scripts/demo          #" in readme
    assert os.access(ROOT / "scripts" / "test", os.X_OK) and os.access(ROOT / "scripts" / "demo", os.X_OK)
