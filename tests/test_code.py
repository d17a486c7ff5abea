"""The shape of the code, kept: short functions, a page streamer that only streams."""

from __future__ import annotations

import ast
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
