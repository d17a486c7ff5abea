"""The real command line (SPEC §1), run as subprocesses on 127.0.0.1."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import free_port, html, json_lines, write_config

PAGE = """\
<!DOCTYPE html>
<html><body>
<p>before</p>
<fragment id="a" src="{url}"></fragment>
<p>after</p>
</body></html>
"""

BAD_ROUTES = """\
settings:
  fragment_timeout_ms: -1
routes:
  - name: page
    match: {path: page}
    template: page.html
  - name: other
    match: {path: /other}
    bogus: 1
    template: page.html
"""

BAD_TEMPLATE = """\
<html><body>
<fragment src="ftp://a.svc/x"></fragment>
<p>ok</p>
<fragment src="http://a.svc/y" timeout="soon"></fragment>
</body></html>
"""


def refuses(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


def run_cli(*args: str, cwd: Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "composer", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def problem_lines(stderr: str, label: str) -> list[int]:
    """Line numbers of `label:LINE: message` lines; every stderr line must be one."""
    lines = stderr.splitlines()
    out = []
    for line in lines:
        m = re.fullmatch(re.escape(label) + r":(\d+): \S.*", line)
        assert m is not None, f"not `{label}:LINE: message`: {line!r}\n{stderr}"
        out.append(int(m.group(1)))
    return out


# --- check ---------------------------------------------------------------------------

def test_help():
    result = subprocess.run([sys.executable, "-m", "composer", "--help"], capture_output=True, text=True,
                            timeout=20)
    assert result.returncode == 0, result.stderr
    for command in ("serve", "check", "demo"):
        assert command in result.stdout


def test_check_ok_with_default_config(tmp_path):
    write_config(tmp_path, {"page.html": PAGE.format(url="http://127.0.0.1:1/x")})
    result = run_cli("check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and "ok" in lines[0], result.stdout


def test_check_relative_paths_follow_the_config_file(tmp_path):
    (tmp_path / "conf").mkdir()
    write_config(tmp_path / "conf", {"page.html": PAGE.format(url="http://127.0.0.1:1/x")})
    result = run_cli("check", "--config", "conf/routes.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_check_warns_that_a_header_composer_sends_itself_need_not_be_forwarded(tmp_path):
    """A config written for Tailor lists x-request-id: it loads, and `check` says it is redundant."""
    write_config(tmp_path, {"page.html": PAGE.format(url="http://127.0.0.1:1/x")},
                 settings="settings:\n  forward_headers:\n    - cookie\n    - X-Request-Id\n")
    result = run_cli("check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        ("routes.yaml:4: warning: settings.forward_headers: 'x-request-id' is sent by composer itself; "
         "listing it changes nothing")], result.stderr
    assert "ok" in result.stdout


def test_check_default_config_is_routes_yaml_in_cwd(tmp_path):
    (tmp_path / "other.yaml").write_text("routes: []\n", encoding="utf-8")
    result = run_cli("check", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert problem_lines(result.stderr, "routes.yaml") == [1]


def test_check_bad_config(tmp_path):
    write_config(tmp_path, {"page.html": PAGE.format(url="http://127.0.0.1:1/x")}, routes=BAD_ROUTES)
    result = run_cli("check", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert sorted(problem_lines(result.stderr, "routes.yaml")) == [2, 5, 9]


def test_check_bad_template(tmp_path):
    write_config(tmp_path, {"page.html": BAD_TEMPLATE})
    result = run_cli("check", "--config", "routes.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert sorted(problem_lines(result.stderr, str(Path("templates") / "page.html"))) == [2, 4]


@pytest.mark.parametrize(("routes", "template", "label", "lines"), [
    (BAD_ROUTES, PAGE.format(url="http://127.0.0.1:1/x"), "routes.yaml", [2, 5, 9]),
    (None, BAD_TEMPLATE, str(Path("templates") / "page.html"), [2, 4]),
], ids=["config", "template"])
def test_serve_bad_config_exits_2_and_listens_on_nothing(tmp_path, routes, template, label, lines):
    write_config(tmp_path, {"page.html": template}, routes=routes)
    port, admin = free_port(), free_port()
    result = run_cli("serve", "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin),
                     cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert sorted(problem_lines(result.stderr, label)) == lines
    assert refuses(port) and refuses(admin)


# --- serve and demo as running processes ---------------------------------------------

class Running:
    """A `python -m composer ...` subprocess; stdout piped, stderr into a file."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.cwd, self.args = cwd, args
        self.stderr_path = cwd / f"stderr-{time.monotonic_ns()}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.first_line = ""

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    async def __aenter__(self) -> Running:
        with open(self.stderr_path, "wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "composer", *self.args, cwd=self.cwd,
                stdout=asyncio.subprocess.PIPE, stderr=err, stdin=asyncio.subprocess.DEVNULL)
        try:
            assert self.proc.stdout is not None
            line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
        except BaseException:
            await self.close()
            raise
        if not line:
            await self.close()
            pytest.fail(f"composer {' '.join(self.args)} exited ({self.proc.returncode}) before it was "
                        f"ready; stderr:\n{self.stderr}")
        self.first_line = line.decode().strip()
        return self

    async def wait(self, timeout: float = 15) -> tuple[int, str]:
        """Wait for exit; returns (status, the rest of stdout)."""
        assert self.proc is not None
        out, _ = await asyncio.wait_for(self.proc.communicate(), timeout)
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode()

    async def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.communicate()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def get(url: str, timeout: float = 10) -> tuple[int, str]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.get(url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return r.status, await r.text()


async def poll(condition, deadline: float, what: str) -> None:
    """Await `condition()` until it is true, every 20 ms, failing after `deadline` seconds."""
    end = time.monotonic() + deadline
    while not await condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_serve_composes_then_drains_on_sigterm(tmp_path, fragments):
    svc = await fragments({"/a": html("<p>fragment A</p>"),
                           "/slow": html("<p>slow fragment</p>", delay=1.5)})
    write_config(tmp_path, {
        "page.html": PAGE.format(url=svc.url("/a")),
        "slow.html": PAGE.format(url=svc.url("/slow")),
    }, routes="""
        routes:
          - name: page
            match: {path: /page}
            template: page.html
          - name: slow
            match: {path: /slow}
            template: slow.html
    """)
    port, admin = free_port(), free_port()
    base, admin_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
    async with Running(tmp_path, "serve", "--host", "127.0.0.1", "--port", str(port),
                       "--admin-port", str(admin)) as composer:
        assert base in composer.first_line and admin_base in composer.first_line, composer.first_line

        status, body = await get(base + "/page")
        assert status == 200
        assert body == PAGE.replace('<fragment id="a" src="{url}"></fragment>', "<p>fragment A</p>")
        assert (await get(admin_base + "/healthz"))[0] == 200
        assert (await get(admin_base + "/readyz"))[0] == 200
        assert (await get(base + "/nothing-here"))[0] == 404

        in_flight = asyncio.create_task(get(base + "/slow"))
        try:
            async def fragment_requested() -> bool:
                return svc.hits.get("/slow", 0) >= 1
            await poll(fragment_requested, 5, "the slow fragment to be requested")

            assert composer.proc is not None
            composer.proc.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                try:
                    return (await get(admin_base + "/readyz", timeout=1))[0] == 503
                except aiohttp.ClientConnectionError:
                    return True        # the admin port is closed after the drain
            await poll(not_ready, 5, "/readyz to stop answering 200 after SIGTERM")

            async def page_port_closed() -> bool:
                return refuses(port)
            await poll(page_port_closed, 5, "the page listener to stop accepting after SIGTERM")

            status, body = await asyncio.wait_for(in_flight, 10)
        finally:
            if not in_flight.done():
                in_flight.cancel()
                await asyncio.gather(in_flight, return_exceptions=True)
        assert status == 200
        assert body == PAGE.replace('<fragment id="a" src="{url}"></fragment>', "<p>slow fragment</p>")

        code, rest = await composer.wait()
        assert code == 0, composer.stderr
        assert rest == "", "serve prints one line only"
        records = json_lines(composer.stderr)
        assert records, "no log lines on stderr"
        assert refuses(port) and refuses(admin)
        # The access lines (written without a LogRecord: composer.access.AccessLog) read as
        # the formatter's lines do: same keys in the same order, the same timestamp form.
        access = [r for r in records if r.get("logger") == "composer.access"]
        assert [(r["path"], r["status"], r["route"]) for r in access] == [
            ("/page", 200, "page"), ("/nothing-here", 404, ""), ("/slow", 200, "slow")], access
        for line in access:
            assert list(line) == ["ts", "level", "logger", "msg", "method", "path", "status", "duration_ms",
                                  "route", "request_id", "remote"], line
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"]), line
            assert (line["level"], line["msg"], line["method"], line["remote"]) == ("info", "access", "GET", "127.0.0.1")
            assert len(line["request_id"]) == 32 and isinstance(line["duration_ms"], float)
        stopped = next(r for r in records if r.get("msg") == "stopped")  # a record's line, for the shape
        assert list(stopped)[:4] == ["ts", "level", "logger", "msg"]


async def test_serve_exits_0_on_sigint(tmp_path):
    write_config(tmp_path, {"page.html": "<html><body><p>static</p></body></html>\n"})
    port, admin = free_port(), free_port()
    async with Running(tmp_path, "serve", "--config", "routes.yaml", "--host", "127.0.0.1",
                       "--port", str(port), "--admin-port", str(admin)) as composer:
        assert f":{port}" in composer.first_line
        status, body = await get(f"http://127.0.0.1:{port}/page")
        assert (status, body) == (200, "<html><body><p>static</p></body></html>\n")
        assert (await get(f"http://127.0.0.1:{admin}/healthz"))[0] == 200
        assert composer.proc is not None
        composer.proc.send_signal(signal.SIGINT)
        code, _ = await composer.wait()
        assert code == 0, composer.stderr
        json_lines(composer.stderr)
        assert refuses(port) and refuses(admin)


async def test_demo(tmp_path):
    port, admin = free_port(), free_port()
    async with Running(tmp_path, "demo", "--port", str(port), "--admin-port", str(admin)) as demo:
        base = f"http://127.0.0.1:{port}"
        assert base in demo.first_line, demo.first_line

        status, body = await get(base + "/products/42")
        assert status == 200, body
        assert "Espresso machine" in body and "199.00 EUR" in body
        assert "Reviews are taking a break" in body           # inline fallback of a failing fragment
        assert "You may also like" in body                     # the async recommendations
        assert "No recommendations right now" not in body
        assert body.rstrip().endswith("</html>")

        status, body = await get(base + "/products/404")
        assert status == 404

        assert (await get(f"http://127.0.0.1:{admin}/healthz"))[0] == 200

        assert demo.proc is not None
        demo.proc.send_signal(signal.SIGTERM)
        code, _ = await demo.wait()
        assert code == 0, demo.stderr
        services = re.search(r"fragment services: http://127\.0\.0\.1:(\d+)", demo.first_line)
        assert services is not None, demo.first_line
        assert refuses(port) and refuses(admin) and refuses(int(services[1]))


async def test_two_demos_run_side_by_side_on_their_own_fragment_ports(tmp_path):
    """Each demo's fragment services take a free port (a fixed 9101 made the second one, or the
    suite beside a demo, fail with 'address already in use')."""
    ports = [(free_port(), free_port()) for _ in range(2)]
    async with Running(tmp_path, "demo", "--port", str(ports[0][0]), "--admin-port", str(ports[0][1])) as one, \
            Running(tmp_path, "demo", "--port", str(ports[1][0]), "--admin-port", str(ports[1][1])) as two:
        origins = {re.search(r"fragment services: (\S+),", d.first_line)[1] for d in (one, two)}  # type: ignore[index]
        assert len(origins) == 2, (one.first_line, two.first_line)
        for port, _ in ports:
            status, body = await get(f"http://127.0.0.1:{port}/products/42")
            assert status == 200 and "Espresso machine" in body and "You may also like" in body


async def test_demo_says_which_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        running = Running(tmp_path, "demo", "--port", str(busy), "--admin-port", str(free_port()))
        with pytest.raises(pytest.fail.Exception, match="cannot listen"):
            async with running:
                pass
        assert "--port" in running.stderr and "Traceback" not in running.stderr


# --- the name, the version ------------------------------------------------------------

def test_version_is_written_once_and_both_commands_say_it():
    from importlib.metadata import version

    import composer

    assert version("fragment-composer") == composer.__version__
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert not re.search(r'^version\s*=', pyproject, re.MULTILINE), "the version lives in composer/__init__.py only"
    scripts = Path(sys.executable).parent
    for argv in ([str(scripts / "composer")], [str(scripts / "fragment-composer")], [sys.executable, "-m", "composer"]):
        done = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"composer {composer.__version__} (fragment-composer, the edge proxy composing " \
                              "pages from fragments)\n", argv
        done = subprocess.run([*argv, "check", "--help"], capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0 and "--config" in done.stdout

