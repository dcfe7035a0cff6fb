from __future__ import annotations

from tests.conftest import GatewayFactory, sdk

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
