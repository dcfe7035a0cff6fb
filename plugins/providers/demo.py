"""Provider ``demo``: deterministic, offline answers so the gateway works with no API keys.

Chat answers restate the last user message; streams send the answer word by word (with an optional
``delay`` in seconds between chunks); embeddings are unit vectors derived from a hash of the text
(``dimensions`` honoured). Usage counts words, so accounting has real numbers to record.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

from llmgateway.core.config import ProviderConfig
from llmgateway.core.errors import InvalidRequestError
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.provider import Provider, UpstreamCall
from llmgateway.core.sse import DONE, frame
from llmgateway.core.types import Usage


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(
                    str(part.get("text", ""))
                    for part in content
                    if isinstance(part, dict) and part.get("type") == "text"
                )
    return ""


def _words(text: str) -> int:
    return len(text.split())


class DemoProvider(Provider):
    capabilities = frozenset({"chat", "chat_stream", "completions", "completions_stream", "embeddings"})
    option_keys = frozenset({"delay", "reply"})

    @classmethod
    def validate_config(cls, config: ProviderConfig) -> None:
        super().validate_config(config)
        delay = config.options.get("delay", 0)
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or delay < 0:
            from llmgateway.core.errors import ConfigError

            raise ConfigError("must be a number of seconds ≥ 0", key=f"{config.key}.delay")

    def _answer(self, prompt: str) -> str:
        template = str(self.option("reply", "Hello from the llmgateway demo provider! You said: {prompt}"))
        return template.replace("{prompt}", prompt.strip() or "(nothing)")

    def _usage(self, prompt_text: str, answer: str) -> Usage:
        return Usage(prompt_tokens=max(1, _words(prompt_text)), completion_tokens=max(1, _words(answer)))

    @staticmethod
    def _id(call: UpstreamCall, prefix: str) -> str:
        return f"{prefix}-{call.ctx.request_id}"

    async def chat(self, call: UpstreamCall) -> dict[str, Any]:
        messages = call.body.get("messages") or []
        prompt = _last_user_text(messages)
        answer = self._answer(prompt)
        call.usage = self._usage(" ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict)), answer)
        call.finish_reason = "stop"
        call.upstream_model = call.deployment.model
        return {
            "id": self._id(call, "chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.alias,
            "system_fingerprint": "llmgateway-demo",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": call.usage.as_openai(),
        }

    async def chat_stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        messages = call.body.get("messages") or []
        answer = self._answer(_last_user_text(messages))
        call.upstream_model = call.deployment.model
        delay = float(self.option("delay", 0))
        base = {
            "id": self._id(call, "chatcmpl"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": call.alias,
            "system_fingerprint": "llmgateway-demo",
        }
        yield frame(
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        )
        pieces = answer.split(" ")
        for i, word in enumerate(pieces):
            if delay:
                await asyncio.sleep(delay)
            text = word if i == 0 else " " + word
            yield frame({**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
        yield frame({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        call.usage = self._usage(" ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict)), answer)
        call.finish_reason = "stop"
        if call.include_usage:
            yield frame({**base, "choices": [], "usage": call.usage.as_openai()})
        yield DONE

    async def completions(self, call: UpstreamCall) -> dict[str, Any]:
        prompt = call.body.get("prompt", "")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        answer = self._answer(text)
        call.usage = self._usage(text, answer)
        call.finish_reason = "stop"
        return {
            "id": self._id(call, "cmpl"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": call.alias,
            "choices": [{"index": 0, "text": answer, "logprobs": None, "finish_reason": "stop"}],
            "usage": call.usage.as_openai(),
        }

    async def completions_stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        prompt = call.body.get("prompt", "")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        answer = self._answer(text)
        base = {
            "id": self._id(call, "cmpl"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": call.alias,
        }
        for i, word in enumerate(answer.split(" ")):
            yield frame(
                {
                    **base,
                    "choices": [
                        {"index": 0, "text": word if i == 0 else " " + word, "logprobs": None, "finish_reason": None}
                    ],
                }
            )
        yield frame({**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]})
        call.usage = self._usage(text, answer)
        call.finish_reason = "stop"
        if call.include_usage:
            yield frame({**base, "choices": [], "usage": call.usage.as_openai()})
        yield DONE

    async def embeddings(self, call: UpstreamCall) -> dict[str, Any]:
        raw = call.body.get("input")
        inputs: list[str]
        if isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            inputs = list(raw)
        elif isinstance(raw, list):
            inputs = [" ".join(map(str, item)) if isinstance(item, list) else str(item) for item in raw]
        else:
            raise InvalidRequestError("'input' must be a string or a list", param="input")
        dimensions = call.body.get("dimensions") or 16
        encoding = call.body.get("encoding_format") or "float"
        data = []
        for index, text in enumerate(inputs):
            vector = _vector(text, int(dimensions))
            embedding: Any = vector
            if encoding == "base64":
                embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(max(1, _words(text)) for text in inputs)
        call.usage = Usage(prompt_tokens=tokens)
        return {
            "object": "list",
            "data": data,
            "model": call.alias,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def _vector(text: str, dimensions: int) -> list[float]:
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        values.extend((b - 127.5) / 127.5 for b in digest)
        counter += 1
    values = values[:dimensions]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]


@hookimpl
def llmgateway_register_providers() -> dict[str, type[Provider]]:
    return {"demo": DemoProvider}
