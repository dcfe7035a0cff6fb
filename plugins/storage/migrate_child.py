"""Migrate a database in a process of its own: ``python -m llmgateway.plugins.storage.migrate_child``.

Started by the storage plugin when ``llmgateway serve`` finds a database that needs migrations.
Migrating builds and drops a lot: done inside the server it left ~16 MB of heap the server could
never give back (fragmentation: ~1.3 MB of live objects remained, measured with tracemalloc); done
here, that memory leaves with this process. The URL and timeout come from the environment (a URL
may carry a password: never on a command line). Prints the migrations it ran, comma-separated.
"""

from __future__ import annotations

import asyncio
import os

from .database import Database

URL_ENV = "LLMGATEWAY_MIGRATE_URL"
TIMEOUT_ENV = "LLMGATEWAY_MIGRATE_TIMEOUT"


async def main() -> None:
    db = Database(os.environ[URL_ENV], float(os.environ[TIMEOUT_ENV]))
    await db.open()
    try:
        print(", ".join(await db.migrate()))
    finally:
        await db.close()


if __name__ == "__main__":
    asyncio.run(main())
