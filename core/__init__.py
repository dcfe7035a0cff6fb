"""The core: one request path (parse → hook chain → provider → stream back) and the interfaces
plugins implement. It depends on starlette, httpx (over its own HTTP/1.1 pool, h1.py), pluggy and orjson only."""
