"""The shipped alerts, end to end: a real Prometheus scraping a real composer.

Debian's /usr/bin/prometheus (installed by .ci/run, like promtool) scrapes `composer serve`'s
admin /metrics every second and evaluates a copy of deploy/prometheus-rules.yaml whose
minutes are seconds. A canary version of a manifest fragment answers 500: the failure-ratio
alert must fire naming fragment, version and owner, and the fallback alert must fire too:
the fragment never showed a fallback before, and the alert's comparison with the past
(`offset`) has a series to compare with only because composer exports its fallback counter
at 0 from the start. Rolling back in the manifest file must resolve both.

Every process started here stops when the test ends, whatever happens: composer through
conftest's `Serve`, Prometheus in a `finally`. No fixed waits: each phase polls Prometheus'
own API with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import Serve, eventually, free_port, html, replace_file, write_config

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus-rules.yaml"
RATIO, FALLBACKS = "ComposerFragmentFailureRatioHigh", "ComposerFragmentFallbacksRisingAfterVersionChange"
OWNER = "team-checkout"
# Minutes of the shipped rules → seconds here. A range keeps ≥ 4 scrapes. The fallback alert
# only fires while the version change is younger than its `offset` (30m → 20 s): that must
# leave ample time for reload, scrapes, rate and `for` on a loaded machine (about 7 s here).
_RANGE, _OFFSET, _FOR = 0.8, 2 / 3, 0.4


def shortened(rules: str) -> str:
    """`rules` with every `[Nm]` range, `offset Nm` and `for: Nm` turned into seconds."""
    text = re.sub(r"\[(\d+)m\]", lambda m: f"[{max(4, round(int(m[1]) * _RANGE))}s]", rules)
    text = re.sub(r"offset (\d+)m\b", lambda m: f"offset {round(int(m[1]) * _OFFSET)}s", text)
    text = re.sub(r"for: (\d+)m\b", lambda m: f"for: {max(1, round(int(m[1]) * _FOR))}s", text)
    assert not re.search(r"\[\d+[mh]\]|offset \d+[mh]\b|for: \d+[mh]\b", text), "a duration left unshortened"
    return text


@contextlib.asynccontextmanager
async def prometheus(folder: Path, target: str) -> AsyncIterator[str]:
    """Prometheus on a free loopback port, scraping `target` and evaluating the shortened
    rules every second, with its storage in `folder`; yields its base URL. Stopped on exit."""
    binary = shutil.which("prometheus", path="/usr/bin:/usr/local/bin") or shutil.which("prometheus")
    assert binary, "prometheus is needed (Debian's prometheus package; .ci/run installs it)"
    (folder / "rules.yaml").write_text(shortened(RULES.read_text(encoding="utf-8")), encoding="utf-8")
    (folder / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(folder / "rules.yaml")],
        "scrape_configs": [{"job_name": "composer", "static_configs": [{"targets": [target]}]}],
    }), encoding="utf-8")
    port = free_port()
    with open(folder / "prometheus.log", "wb") as log:  # noqa: ASYNC230 - a local file, handed to the child
        proc = await asyncio.create_subprocess_exec(
            binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def api(session: aiohttp.ClientSession, url: str, **params: str) -> Any:
    """`data` of a Prometheus API answer, or None while Prometheus is not up yet."""
    try:
        async with session.get(url, params=params, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            if resp.status != 200:
                return None
            return (await resp.json())["data"]
    except aiohttp.ClientConnectionError:
        return None


async def test_canary_failing_fires_both_alerts_and_rollback_resolves_them(fragments, tmp_path):
    good = await fragments({"/footer/1.0": html("<p>footer 1.0</p>")})
    broken = await fragments({"/footer/2.0": html("down", status=500)})
    footer = {"owner": OWNER, "active": "1.0",
              "versions": {"1.0": good.url("/footer/1.0"), "2.0": broken.url("/footer/2.0")}}
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"fragments": {"footer": footer}}), encoding="utf-8")
    write_config(tmp_path, {"page.html": '<body><fragment name="footer"><p>no footer</p></fragment></body>'},
                 settings="settings:\n  reload_interval_ms: 100\n  manifest: manifest.yaml\n")
    (tmp_path / "prometheus").mkdir()

    async with Serve(tmp_path) as serve, prometheus(tmp_path / "prometheus", f"127.0.0.1:{serve.admin_port}") as prom, \
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        shown: dict[str, int] = {}

        async def traffic() -> None:
            """Users in bucket 0 (the canary's, once there is one) and 99 (always the active)."""
            bucket = 0
            while True:
                async with session.get(serve.base + "/page", headers={"Cookie": f"composer_bucket={bucket}"}) as resp:
                    body = await resp.text()
                    assert resp.status == 200, body
                which = "fallback" if "no footer" in body else "footer"
                shown[which] = shown.get(which, 0) + 1
                bucket = 99 - bucket
                await asyncio.sleep(0.04)

        async def alerts() -> dict[str, list[dict[str, Any]]]:
            """Prometheus' pending and firing alerts by name (and a failed page, if any, raised)."""
            if load.done():
                load.result()
            data = await api(session, prom + "/api/v1/alerts")
            found: dict[str, list[dict[str, Any]]] = {}
            for alert in data["alerts"] if data else ():
                found.setdefault(alert["labels"]["alertname"], []).append(alert)
            return found

        async def history() -> bool:
            """Prometheus has scraped composer since before what the fallback alert looks back to."""
            window, offset = max(4, round(5 * _RANGE)), round(30 * _OFFSET)
            data = await api(session, prom + "/api/v1/query",
                             query=f'count_over_time(up{{job="composer"}}[{window}s] offset {offset}s) >= 2')
            return bool(data and data["result"])

        load = asyncio.create_task(traffic())
        try:
            await eventually(history, "Prometheus to have scraped composer for the fallback alert's look-back",
                             deadline=40)
            assert not await alerts()
            assert shown.get("fallback", 0) == 0

            # The canary goes out, and fails every request.
            replace_file(manifest, yaml.safe_dump({"fragments": {"footer": {
                **footer, "canary": {"version": "2.0", "percent": 50}}}}))
            fired: dict[str, dict[str, str]] = {}

            async def both_fired() -> bool:
                for name, found in (await alerts()).items():
                    for alert in found:
                        if alert["state"] == "firing" and name in (RATIO, FALLBACKS):
                            fired.setdefault(name, alert["labels"])
                            assert alert["labels"].get("version") != "1.0", alert  # the active is fine
                return len(fired) == 2
            try:
                await eventually(both_fired, "both alerts to fire", deadline=15)
            except pytest.fail.Exception:
                pytest.fail(f"fired: {sorted(fired)}, not both {RATIO} and {FALLBACKS} (pending or firing now: "
                            f"{sorted(await alerts())})")
            assert shown.get("fallback", 0) > 0
            assert fired[RATIO] == {"alertname": RATIO, "fragment": "footer", "version": "2.0", "owner": OWNER,
                                    "severity": "page"}
            assert fired[FALLBACKS] == {"alertname": FALLBACKS, "fragment": "footer", "severity": "page"}

            # Roll back: the canary is dropped from the manifest file. (The fallback alert would
            # also end once the version change is older than its look-back; this is well before.)
            replace_file(manifest, yaml.safe_dump({"fragments": {"footer": footer}}))

            async def resolved() -> bool:
                found = await alerts()
                return RATIO not in found and FALLBACKS not in found
            await eventually(resolved, "both alerts to resolve after the rollback", deadline=15)
        finally:
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load


def test_shortened_rules_keep_every_rule_and_turn_minutes_into_seconds():
    """The copy differs from the shipped file only in its durations."""
    shipped = RULES.read_text(encoding="utf-8")
    short = shortened(shipped)
    assert "[4s]" in short and "offset 20s" in short and "for: 2s" in short
    assert re.sub(r"\d+[ms]\b", "D", short) == re.sub(r"\d+[ms]\b", "D", shipped)
    assert [r.get("alert") for g in yaml.safe_load(short)["groups"] for r in g["rules"]] == \
        [r.get("alert") for g in yaml.safe_load(shipped)["groups"] for r in g["rules"]]

