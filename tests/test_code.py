"""The shape of the code, kept: short functions, a page streamer that only streams."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "composer"
MAX_FUNCTION_LINES = 60


def test_no_function_in_the_package_is_over_60_lines() -> None:
    long = []
    for file in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{file.name}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)


def _compiled_modules() -> list[str]:
    """scripts/compile's MODULES, read from the script."""
    script = ast.parse((PACKAGE.parent / "scripts" / "compile").read_text(encoding="utf-8"))
    for node in script.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "MODULES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("scripts/compile has no MODULES")


def test_no_compiled_coroutine_awaits_inside_an_except_clause() -> None:
    """Compiled (scripts/compile), a coroutine suspended inside an `except` clause leaves the
    exception it caught in the thread's state: every task the loop runs meanwhile sees it as
    the exception being handled, and chains its own errors to it. Await after the clause.
    (Interpreted coroutines keep their own exception state: cli, demo and reload may.)"""
    found = []
    modules = _compiled_modules()
    assert "client" in modules and "pipeline" in modules
    for name in modules:
        file = PACKAGE / f"{name}.py"
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Try | ast.TryStar):
                for handler in node.handlers:
                    for inner in (n for stmt in handler.body for n in ast.walk(stmt)):
                        if isinstance(inner, ast.Await | ast.AsyncWith | ast.AsyncFor):
                            found.append(f"{file.name}:{inner.lineno}")
    assert not found, found


def test_compose_only_streams_a_page() -> None:
    """Fragment policy lives in pipeline.py; compose.py stays a page streamer (≤ 300 lines)."""
    assert len((PACKAGE / "compose.py").read_text(encoding="utf-8").splitlines()) <= 300


# From files to a table: none of these may import the per-request side (compose, pipeline,
# server, …), so a table can be loaded, checked and reloaded without it. client, metrics and
# links are leaves (they import nothing of composer's but errors) and serve both sides.
TABLE_SIDE = {"errors", "nodes", "headers", "urls", "predicates", "filters", "breaker", "manifest", "config",
              "template", "collector", "routing", "reload", "layouts", "tailor"}
LEAVES = {"client", "metrics", "links"}


def test_the_table_side_never_imports_the_request_side() -> None:
    wrong = []
    for name in sorted(TABLE_SIDE):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                imported = node.module.split(".")[0]
                if imported not in TABLE_SIDE | LEAVES:
                    wrong.append(f"{name} imports {imported}")
    assert not wrong, wrong


def test_a_compiled_module_whose_source_changed_refuses_to_import(tmp_path: Path) -> None:
    """scripts/compile's builds are imported before their sources: a source edited after the
    build must stop composer at import, naming the file, not silently not run."""
    package = tmp_path / "composer"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("*.so", "__pycache__", "_native.json"))
    built = {name: hashlib.sha256((package / f"{name}.py").read_bytes()).hexdigest() for name in ("client", "pipeline")}
    (package / "_native.json").write_text(json.dumps(built))

    def import_it() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", "import composer"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, check=False)

    done = import_it()
    assert done.returncode == 0, done.stderr
    with (package / "pipeline.py").open("a", encoding="utf-8") as source:
        source.write("\n# an edit after the build\n")
    done = import_it()
    assert done.returncode == 1
    assert f"{package / 'pipeline'}.py changed after scripts/compile built it" in done.stderr
    assert "scripts/compile --clean" in done.stderr
