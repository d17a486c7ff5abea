"""Route matching cost against a 1,000-route table: µs per match, first/middle/last/miss.

    python bench/match.py

Three tables of 1,000 backend routes each (backends need no templates, so only matching
is measured):
  * distinct — every route under its own first segment (/team0/..., /team1/..., ...),
    a mix of path, path_prefix, {param}, {rest:.*}, host and header predicates;
  * shared   — every route under /api/v1/ (the index must go two segments deep);
  * worst    — every route starts with a parameter ({team:t0}/...), so the index cannot
    narrow anything and the lookup is a scan in file order: the honest upper bound.
"""

from __future__ import annotations

import sys
import tempfile
import time
import timeit
from pathlib import Path

from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from composer import load
from composer.routing import split_target

N = 1000


def _route(i: int, match: str) -> str:
    return f"  - name: r{i}\n    match: {match}\n    backend: http://127.0.0.1:9\n"


def distinct(i: int) -> tuple[str, str]:
    kind = i % 5
    if kind == 0:
        return _route(i, f'{{path: "/team{i}/products/{{sku}}"}}'), f"/team{i}/products/abc-123"
    if kind == 1:
        return _route(i, f"{{path_prefix: /team{i}/api}}"), f"/team{i}/api/cart/items"
    if kind == 2:
        return _route(i, f'{{path: "/team{i}/static/{{rest:.*}}"}}'), f"/team{i}/static/css/site.css"
    if kind == 3:
        return _route(i, f'{{path: /team{i}/about, host: "*.example.com"}}'), f"/team{i}/about"
    return _route(i, f'{{path: /team{i}/beta, headers: {{x-beta: "~^on$"}}}}'), f"/team{i}/beta"


def shared(i: int) -> tuple[str, str]:
    return _route(i, f'{{path: "/api/v1/svc{i}/{{id}}"}}'), f"/api/v1/svc{i}/42"


def worst(i: int) -> tuple[str, str]:
    return _route(i, f'{{path: "/{{team:t{i}}}/{{id}}"}}'), f"/t{i}/42"


def measure(name: str, make) -> None:  # type: ignore[no-untyped-def]
    routes, paths = zip(*(make(i) for i in range(N)), strict=True)
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "routes.yaml"
        file.write_text("routes:\n" + "".join(routes), encoding="utf-8")
        started = time.perf_counter()
        table = load(file)
        built = time.perf_counter() - started
    headers = CIMultiDict({"host": "shop.example.com", "x-beta": "on"})
    cases = {"first": paths[0], "middle": paths[N // 2], "last": paths[-1], "miss": "/nothing/here/at/all"}
    row = []
    for label, target in cases.items():
        request = make_mocked_request("GET", target, headers=headers)
        path, _ = split_target(request.raw_path)
        expected = None if label == "miss" else f"r{paths.index(target)}"
        got = table.match(request, path).route
        assert (got.name if got else None) == expected, (label, got)
        timer = timeit.Timer(lambda: table.match(request, path))  # noqa: B023
        number, _ = timer.autorange()
        best = min(timer.repeat(repeat=5, number=number))
        row.append(f"{best / number * 1e6:.2f}")
    print(f"| {name} | " + " | ".join(row) + f" | {built * 1000:.0f} |")


def main() -> None:
    print(f"µs per match, {N} routes (best of 5 runs); load = ms to load and compile the table\n")
    print("| table | first | middle | last | miss | load |")
    print("|---|---:|---:|---:|---:|---:|")
    measure("distinct", distinct)
    measure("shared", shared)
    measure("worst", worst)


if __name__ == "__main__":
    main()
