"""Bad input gets a clear error: clients get the OpenAI envelope with the right status, operators get
the file, key and reason at startup."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmgateway.core.config import load_config, parse_config
from llmgateway.core.errors import ConfigError
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.types import RequestContext
from tests.conftest import GatewayFactory
from tests.servers import running

DEMO = """
[providers.demo]
type = "demo"

[[models]]
name = "demo"
deployments = [{ provider = "demo", model = "demo-1" }]
"""
MESSAGES = [{"role": "user", "content": "hi"}]


def assert_envelope(
    response: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"]
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES}, "model"),
        ({"model": 3, "messages": MESSAGES}, "model"),
        ({"model": "demo"}, "messages"),
        ({"model": "demo", "messages": []}, "messages"),
        ({"model": "demo", "messages": "hi"}, "messages"),
        ({"model": "demo", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "demo", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "demo", "messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ({"model": "demo", "messages": MESSAGES, "temperature": 3}, "temperature"),
        ({"model": "demo", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"model": "demo", "messages": MESSAGES, "stream": "yes"}, "stream"),
        ({"model": "demo", "messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "demo", "messages": MESSAGES, "tools": [{"type": "function"}]}, "tools[0]"),
        ({"model": "demo", "messages": MESSAGES, "n": True}, "n"),
    ],
)
async def test_wrong_fields_are_400_naming_the_param(
    serve_gateway: GatewayFactory, body: dict[str, Any], param: str
) -> None:
    async with serve_gateway(DEMO) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            response = await http.post("/v1/chat/completions", json=body)
    error = assert_envelope(response, 400, param=param)
    assert error["type"] == "invalid_request_error"


async def test_embeddings_and_completions_fields(serve_gateway: GatewayFactory) -> None:
    async with serve_gateway(DEMO) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            no_input = await http.post("/v1/embeddings", json={"model": "demo"})
            bad_format = await http.post(
                "/v1/embeddings", json={"model": "demo", "input": "x", "encoding_format": "hex"}
            )
            no_prompt = await http.post("/v1/completions", json={"model": "demo"})
    assert_envelope(no_input, 400, param="input")
    assert_envelope(bad_format, 400, param="encoding_format")
    assert_envelope(no_prompt, 400, param="prompt")


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"])
async def test_malformed_bodies_are_400(serve_gateway: GatewayFactory, raw: bytes) -> None:
    async with serve_gateway(DEMO) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            response = await http.post(
                "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
            )
    assert_envelope(response, 400)


async def test_unknown_model_is_404_model_not_found(serve_gateway: GatewayFactory) -> None:
    async with serve_gateway(DEMO) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            response = await http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": MESSAGES})
    error = assert_envelope(response, 404, param="model", code="model_not_found")
    assert "gpt-9" in error["message"]


async def test_body_over_the_limit_is_413(serve_gateway: GatewayFactory) -> None:
    async with serve_gateway(DEMO + "\n[server]\nmax_body_bytes = 2048\n") as url:
        async with httpx.AsyncClient(base_url=url) as http:
            big = {"model": "demo", "messages": [{"role": "user", "content": "x" * 5000}]}
            response = await http.post("/v1/chat/completions", json=big)

            async def chunks() -> Any:  # no content-length: the limit holds while reading
                for _ in range(10):
                    yield b" " * 1000

            streamed = await http.post("/v1/chat/completions", content=chunks())
    assert_envelope(response, 413, code="request_too_large")
    assert_envelope(streamed, 413, code="request_too_large")


async def test_unknown_path_and_method(serve_gateway: GatewayFactory) -> None:
    async with serve_gateway(DEMO) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            missing = await http.get("/v1/nothing-here")
            wrong_method = await http.get("/v1/chat/completions")
    assert_envelope(missing, 404)
    assert_envelope(wrong_method, 405, code="method_not_allowed")


async def test_a_crashing_plugin_gives_a_500_envelope_without_traceback(
    serve_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    class Crash:
        @hookimpl
        def llmgateway_prepare_request(self, ctx: RequestContext) -> None:
            raise RuntimeError("secret internals sk-should-not-leak-123")

    async with serve_gateway(DEMO, plugins={"crash": Crash()}) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            response = await http.post("/v1/chat/completions", json={"model": "demo", "messages": MESSAGES})
    error = assert_envelope(response, 500, code="internal_error")
    assert "sk-should-not-leak" not in response.text
    assert response.headers["x-request-id"] in error["message"]
    assert any("unhandled error" in r.message for r in caplog.records)


# ---- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        ("[server]\nport = 'eighty'", "server.port", "must be an integer"),
        ("[server]\nprot = 80", "server.prot", "not a known setting (did you mean 'port'?)"),
        ("[providers.x]\nbase_url = 'http://a'", "providers.x.type", "is required"),
        (
            "[[models]]\nname = 'm'\ndeployments = [{ provider = 'ghost', model = 'x' }]",
            "models[0].deployments[0].provider",
            "unknown provider 'ghost'",
        ),
        (
            "[providers.p]\ntype='demo'\n[[models]]\nname = 'm'\ndeployments = []",
            "models[0].deployments",
            "needs at least one deployment",
        ),
        (
            "[providers.p]\ntype='demo'\n[[models]]\nname = 'm'\nfallbacks = ['nope']\ndeployments = [{ provider = 'p', model = 'x' }]",
            "models[0].fallbacks[0]",
            "unknown model 'nope'",
        ),
        (
            "[providers.p]\ntype = 'openai'\napi_key = '${NOT_SET_ANYWHERE_42}'",
            "providers.p.api_key",
            "environment variable NOT_SET_ANYWHERE_42 is not set",
        ),
        ("models = 3", "models", "must be an array of tables"),
        ("[server\nport = 1", "", "not valid TOML"),
    ],
)
def test_config_errors_name_file_key_and_reason(toml: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(toml, file="/etc/gw.toml", env={})
    error = caught.value
    assert error.file == "/etc/gw.toml"
    assert error.key == key
    assert reason in error.reason
    assert str(error).startswith("/etc/gw.toml")


def test_env_interpolation_with_default() -> None:
    config = parse_config(
        "[providers.p]\ntype = 'openai'\napi_key = '${KEY}'\nbase_url = '${BASE:-http://127.0.0.1:9/v1}'",
        env={"KEY": "sk-from-env"},
    )
    assert config.providers["p"].api_key == "sk-from-env"
    assert config.providers["p"].base_url == "http://127.0.0.1:9/v1"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMGATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "llmgateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
        check=False,
    )


def test_cli_check_config_reports_the_key(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(DEMO)
    bad = tmp_path / "bad.toml"
    bad.write_text(DEMO + "\n[providers.broken]\ntype = 'no-such-type'\n")
    ok = run_cli("check-config", "--config", str(good))
    failed = run_cli("check-config", "--config", str(bad))
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    assert failed.returncode == 2
    assert f"{bad}, key 'providers.broken.type': unknown provider type 'no-such-type'" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_cli_plugins_prints_the_chain_in_call_order(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(DEMO)
    result = run_cli("plugins", "--config", str(config))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "llmgateway_authenticate (first-result)" in out
    assert "llmgateway_register_providers (fan-out)" in out
    section = out.split("llmgateway_register_providers (fan-out)")[1].split("\n  llmgateway_")[0]
    assert "- demo  (llmgateway)" in section
    assert "- openai  (llmgateway)" in section


def test_the_repository_gateway_toml_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    result = run_cli("check-config", "--config", str(root / "gateway.toml"), cwd=root)
    assert result.returncode == 0, result.stderr


def test_cli_serve_refuses_bad_config_before_binding(tmp_path: Path) -> None:
    bad = tmp_path / "gateway.toml"
    bad.write_text(textwrap.dedent("[server]\nworkers = 0\n"))
    result = run_cli("serve", "--config", str(bad))
    assert result.returncode == 2
    assert "key 'server.workers': must be at least 1" in result.stderr


@pytest.mark.parametrize(
    ("serving", "setting", "tuned"), [(True, 12345, True), (True, 0, False), (False, 12345, False)]
)
async def test_a_serving_process_tunes_the_garbage_collector(serving: bool, setting: int, tuned: bool) -> None:
    """``[server] gc_threshold``: after startup a serving process freezes what is alive and collects
    young objects less often; 0 leaves Python's settings, and an app that is not served (tests, an
    embedding application) never touches the process's collector."""
    import gc

    from llmgateway.core.app import create_app, gateway_of

    config = parse_config(f"[server]\ngc_threshold = {setting}\n[plugins]\ndisabled = ['storage']\n{DEMO}")
    app = create_app(config)
    gateway_of(app).serving = serving
    before = gc.get_threshold()
    gc.unfreeze()
    try:
        async with running(app):  # listening once startup is done
            assert (gc.get_threshold()[0] == 12345) is tuned
            assert (gc.get_freeze_count() > 0) is tuned
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    with pytest.raises(ConfigError, match="gc_threshold"):
        parse_config("[server]\ngc_threshold = -1")
