"""The third-party plugin template (contrib/example-provider) works as a real installed distribution:
installed with pip into a directory of its own (never into the shared venv), found through its entry
point by ``llmgateway plugins`` and by ``llmgateway serve``, and running in the request chain."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import sdk
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "contrib" / "example-provider"
DIST = "llmgateway-example-provider"

CONFIG = """
[server]
drain_timeout = 1

[example]
header_value = "seen"

[providers.echo]
type = "example-echo"
prefix = "echo: "

[[models]]
name = "echo"
deployments = [{ provider = "echo", model = "echo-1" }]
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install --no-deps --target <dir>`` of a copy of the template (the copy keeps build
    leftovers out of the source tree)."""
    base = tmp_path_factory.mktemp("example-plugin")
    source = base / "source"
    shutil.copytree(TEMPLATE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = base / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert (target / "llmgateway_example_provider" / "__init__.py").exists()
    return target


@pytest.fixture
def env(plugin_dir: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(plugin_dir), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG)
    return path


def hook_sections(output: str) -> dict[str, list[str]]:
    """``llmgateway plugins`` output: hook name -> the implementation lines under it."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith("  llmgateway_"):
            current = sections.setdefault(line.split()[0], [])
        elif line.startswith("    - ") and current is not None:
            current.append(line.strip())
    return sections


def test_plugins_command_lists_the_installed_plugin(env: dict[str, str], config_file: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmgateway", "plugins", "--config", str(config_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    sections = hook_sections(result.stdout)
    expected = f"- example  ({DIST})"
    for hook in ("llmgateway_configure", "llmgateway_register_providers", "llmgateway_prepare_request"):
        assert expected in sections[hook], (hook, result.stdout)
    # third-party plugins run before the built-ins
    assert sections["llmgateway_register_providers"][0] == expected
    assert any(f"[{DIST}]" in line and line.split()[0] == "example" for line in result.stdout.splitlines())


def test_without_the_plugin_the_config_is_refused(config_file: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmgateway", "check-config", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "example" in result.stderr  # the [example] section or the example-echo type is unknown


@contextlib.contextmanager
def serving(config_file: Path, env: dict[str, str], port: int, logs: Path) -> Iterator[subprocess.Popen[bytes]]:
    with (logs / "out.log").open("wb") as out, (logs / "err.log").open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "llmgateway", "serve", "--config", str(config_file), "--port", str(port)],
            env=env,
            stdout=out,
            stderr=err,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


async def wait_listening(process: subprocess.Popen[bytes], port: int, logs: Path) -> None:
    for _ in range(600):
        if process.poll() is not None:
            pytest.fail(f"the gateway exited ({process.returncode}): {(logs / 'err.log').read_text()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    pytest.fail("the gateway never started listening")


async def test_serve_answers_through_the_example_provider(
    env: dict[str, str], config_file: Path, tmp_path: Path
) -> None:
    port = free_port()
    with serving(config_file, env, port, tmp_path) as process:
        await wait_listening(process, port, tmp_path)
        async with sdk(f"http://127.0.0.1:{port}") as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="echo", messages=[{"role": "user", "content": "hello plugin"}]
            )
            answer = raw.parse()
            stream = await client.chat.completions.create(
                model="echo",
                messages=[{"role": "user", "content": "hello stream"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
        assert raw.headers["x-example-plugin"] == "seen"
        assert raw.headers["x-llmgateway-provider"] == "echo"
        assert answer.model == "echo"
        assert answer.choices[0].message.content == "echo: hello plugin"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hello stream"
        assert chunks[-1].usage is not None
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
    assert code == 0, (tmp_path / "err.log").read_text()
    assert "llmgateway listening on" in (tmp_path / "out.log").read_text()
