"""Background job descriptions, offered by plugins through ``llmgateway_register_jobs``.

The scheduler (the operations plugin) runs each job on its cron schedule, on exactly one replica;
``llmgateway jobs run NAME`` runs one now.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, frozen=True)
class Job:
    name: str
    schedule: str  # cron expression, e.g. "0 * * * *"
    run: Callable[[Any], Awaitable[None]]  # called with the Gateway
    description: str = ""
    enabled: bool = True
