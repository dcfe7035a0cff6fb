"""Prices: the shipped table, name matching, gateway.toml overrides, and the cost in the usage row."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from llmgateway.core.app import build_gateway
from llmgateway.core.config import parse_config
from llmgateway.core.errors import ConfigError
from llmgateway.plugins.pricing import Price, lookup, shipped_prices
from tests.conftest import UPSTREAM_KEY, GatewayFactory, sdk
from tests.test_storage_support import usage_rows

TABLE = shipped_prices()


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai/gpt-4.1-mini", "gpt-4.1-mini"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet-v2@20241022", "claude-3-5-sonnet"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("models/gemini-2.0-flash-001", "gemini-2.0-flash"),
        ("gemini-1.5-pro-002", "gemini-1.5-pro"),
        ("mistral-large-latest", "mistral-large"),
        ("mistral-small-2503", "mistral-small"),
        ("command-r-plus-08-2024", "command-r-plus"),
    ],
)
def test_names_resolve_to_the_right_price(model: str, expected: str) -> None:
    assert lookup(TABLE, model) == TABLE[expected]


@pytest.mark.parametrize("model", ["gpt-4.5-turbo-x", "my-local-llama", "demo-1", "gpt"])
def test_unknown_models_have_no_price(model: str) -> None:
    assert lookup(TABLE, model) is None


def test_every_shipped_price_is_sane() -> None:
    assert len(TABLE) >= 40
    for name, price in TABLE.items():
        assert price.input >= 0, name
        assert price.output >= 0, name
        assert price.cached_input is None or price.cached_input <= price.input, name
    for family in ("gpt-4o", "claude-3-5-sonnet", "gemini-2.0-flash", "mistral-large", "command-r"):
        assert family in TABLE


def _gateway(toml: str, tmp_path: Path) -> object:
    path = tmp_path / "gateway.toml"
    path.write_text(toml)
    return build_gateway(parse_config(toml, file=str(path)))


CONFIG = """
[providers.local]
type = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key = "k"

[[models]]
name = "chat"
deployments = [
  { provider = "local", model = "gpt-4o-mini-2024-07-18" },
  { provider = "local", model = "house-model" },
  { provider = "local", model = "gpt-4o", input_price = 1.0, output_price = 2.0 },
]
"""


def test_prices_fill_unpriced_deployments_and_overrides_win(tmp_path: Path) -> None:
    toml = CONFIG + '\n[prices."house-model"]\ninput = 0.5\noutput = 1.5\ncached_input = 0.25\n'
    toml += '\n[prices."gpt-4o-mini"]\ninput = 0.2\noutput = 0.7\n'
    gateway = _gateway(toml, tmp_path)
    mini, house, own = gateway.models["chat"].deployments  # type: ignore[attr-defined]
    assert (mini.input_price, mini.output_price, mini.cached_input_price) == (0.2, 0.7, None)
    assert (house.input_price, house.output_price, house.cached_input_price) == (0.5, 1.5, 0.25)
    assert (own.input_price, own.output_price, own.cached_input_price) == (1.0, 2.0, None)  # its own price stays
    assert gateway.pm.get_plugin("pricing").price("house-model") == Price(0.5, 1.5, 0.25)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[prices."x"]\ninput = 1\n', "key 'prices.x.output': is required"),
        ('[prices."x"]\ninput = 1\noutput = 2\ncached = 1\n', "key 'prices.x.cached': is not a known setting"),
        ('[prices."x"]\ninput = -1\noutput = 2\n', "key 'prices.x.input': must be at least 0"),
        ("[prices]\nx = 3\n", "key 'prices.x': must be a table"),
    ],
)
def test_price_errors_name_the_key(extra: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        _gateway(CONFIG + "\n" + extra, tmp_path)


async def test_cost_in_the_usage_row_uses_the_override(
    serve_gateway: GatewayFactory, upstream: tuple[object, str], tmp_path: Path
) -> None:
    """The fake upstream answers with 11 prompt tokens (3 of them cached) and 9 completion tokens."""
    _, upstream_url = upstream
    toml = textwrap.dedent(
        f"""
        [providers.local]
        type = "openai"
        base_url = "{upstream_url}/v1"
        api_key = "{UPSTREAM_KEY}"

        [[models]]
        name = "house"
        deployments = [{{ provider = "local", model = "house-model" }}]

        [prices."house-model"]
        input = 2.0
        output = 8.0
        cached_input = 0.5
        """
    )
    async with serve_gateway(toml) as url:
        async with sdk(url) as client:
            plain = await client.chat.completions.create(model="house", messages=[{"role": "user", "content": "hi"}])
            stream = await client.chat.completions.create(
                model="house",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            async for _ in stream:
                pass
    assert plain.usage is not None
    rows = await usage_rows(f"sqlite://{tmp_path / 'llmgateway.db'}")
    assert len(rows) == 2
    plain_row = next(r for r in rows if not r["streamed"])
    assert float(plain_row["cost"]) == pytest.approx((8 * 2.0 + 3 * 0.5 + 9 * 8.0) / 1_000_000, abs=1e-8)
    stream_row = next(r for r in rows if r["streamed"])  # the streamed usage reports no cached tokens
    assert float(stream_row["cost"]) == pytest.approx((11 * 2.0 + 9 * 8.0) / 1_000_000, abs=1e-8)
