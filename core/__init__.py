"""The core: one request path (parse → hook chain → provider → stream back) and the interfaces
plugins implement. It depends on starlette, httpx (over aiohttp), pluggy and orjson only."""
