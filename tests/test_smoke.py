from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx

from tests.conftest import GatewayFactory, sdk
from tests.servers import free_port

DEMO = """
[providers.demo]
type = "demo"

[[models]]
name = "demo"
deployments = [{ provider = "demo", model = "demo-1" }]
"""


async def test_demo_answers_plain_and_streamed(serve_gateway: GatewayFactory) -> None:
    async with serve_gateway(DEMO) as url:
        async with sdk(url) as client:
            answer = await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "ping"}])
            stream = await client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "ping"}], stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert answer.model == "demo"
        assert answer.choices[0].message.content is not None
        assert "ping" in answer.choices[0].message.content
        assert text == answer.choices[0].message.content


def test_llmgateway_serve_answers_with_a_date_and_no_server_banner(tmp_path: Path) -> None:
    """The real ``llmgateway serve`` (hypercorn): every answer carries a correct ``Date`` (formatted
    once a second, not per answer) and no ``Server`` software banner."""
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(DEMO)
    process = subprocess.Popen(
        [sys.executable, "-m", "llmgateway", "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                first = httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, "the gateway exited"
                assert time.monotonic() < deadline, "the gateway did not start in 30 s"
                time.sleep(0.1)
        time.sleep(1.1)  # the next second: a new Date, not the one cached for the first answer
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert first.status_code == answer.status_code == 200
    # our own log lines are shown: the new database was migrated, in a child process
    assert b"[INFO] llmgateway.storage: database " in output
    assert b"migrated (in a child process): 0001_initial" in output
    for response in (first, answer):
        assert "server" not in response.headers
        sent = parsedate_to_datetime(response.headers["date"])
        assert abs((datetime.now(UTC) - sent).total_seconds()) < 10
    assert parsedate_to_datetime(answer.headers["date"]) > parsedate_to_datetime(first.headers["date"])
