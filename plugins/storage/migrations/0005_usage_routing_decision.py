"""The routing decision moves into the usage row: one insert per request instead of two.

Every routed request wrote a usage row and a ``routing_decisions`` row (a table of its own, with its
own indexes) in the same transaction: two inserts per request for the write-behind, one table more for
retention to delete from. ``usage_records`` gains the decision's columns (``strategy``, ``chosen``,
``route_reason``, ``candidates``, ``fallbacks``, ``fell_back``, ``outcome``; NULL, and ``fell_back``
false, for a request that was not routed), every existing decision is copied into the usage row of
its request id, and ``routing_decisions`` is dropped. A decision without a usage row is dropped too
(both were always written in one transaction and deleted by the same retention cutoff).

Rolling back re-creates ``routing_decisions`` from the usage rows that carry a decision, then drops
the columns again.
"""

import sqlite3
from typing import Any

from orjson import loads
from tortoise import fields, migrations
from tortoise.fields.data import JSON_DUMPS
from tortoise.migrations import operations as ops

# usage_records column <- routing_decisions column (a frozen copy: a migration keeps doing what it did)
COPIED = (
    ("strategy", "strategy"),
    ("chosen", "chosen"),
    ("route_reason", "reason"),
    ("candidates", "candidates"),
    ("fallbacks", "fallbacks"),
    ("fell_back", "fell_back"),
    ("outcome", "outcome"),
)


async def fold_decisions_in(apps: Any, schema_editor: Any) -> None:
    ours = ", ".join(u for u, _ in COPIED)
    theirs = ", ".join(f"d.{d}" for _, d in COPIED)
    if schema_editor.DIALECT == "postgres":  # a join: one pass over each table
        sets = ", ".join(f"{u} = d.{d}" for u, d in COPIED)
        sql = (
            f"UPDATE usage_records SET {sets} FROM routing_decisions AS d "  # noqa: S608 - constant SQL
            "WHERE d.request_id = usage_records.request_id"
        )
    elif schema_editor.DIALECT == "sqlite":  # row values (SQLite 3.15+): one lookup per row
        sql = (
            f"UPDATE usage_records SET ({ours}) = (SELECT {theirs} FROM routing_decisions AS d "  # noqa: S608
            "WHERE d.request_id = usage_records.request_id) "
            "WHERE request_id IN (SELECT request_id FROM routing_decisions)"
        )
    else:  # MySQL / SQL Server (untested): one subquery per column
        sets = ", ".join(
            f"{u} = (SELECT d.{d} FROM routing_decisions AS d WHERE d.request_id = usage_records.request_id)"  # noqa: S608
            for u, d in COPIED
        )
        sql = f"UPDATE usage_records SET {sets} WHERE request_id IN (SELECT request_id FROM routing_decisions)"  # noqa: S608
    await schema_editor.client.execute_script(sql)


async def split_decisions_out(apps: Any, schema_editor: Any) -> None:
    await schema_editor.client.execute_script(
        "INSERT INTO routing_decisions (request_id, created_at, alias, strategy, chosen, reason, candidates, "
        "fallbacks, fell_back, outcome) SELECT request_id, created_at, COALESCE(alias, ''), strategy, chosen, "
        "COALESCE(route_reason, ''), COALESCE(candidates, '[]'), COALESCE(fallbacks, '[]'), fell_back, "
        "COALESCE(outcome, '') FROM usage_records WHERE strategy IS NOT NULL"
    )


class AddDecisionColumn(ops.AddField):
    """``AddField`` whose rollback on SQLite drops the column in place (``ALTER TABLE … DROP COLUMN``,
    SQLite 3.35+): Tortoise's SQLite ``RemoveField`` rebuilds the table and loses its indexes."""

    async def database_backward(
        self, app_label: str, old_state: Any, new_state: Any, state_editor: Any | None = None
    ) -> None:
        if state_editor is not None and state_editor.DIALECT == "sqlite" and sqlite3.sqlite_version_info >= (3, 35):
            await state_editor.client.execute_script(f'ALTER TABLE usage_records DROP COLUMN "{self.name}"')
            return
        await super().database_backward(app_label, old_state, new_state, state_editor)


class Migration(migrations.Migration):
    dependencies = [("models", "0004_usage_hour_index")]

    initial = False

    operations = [
        AddDecisionColumn(
            model_name="UsageRecord",
            name="strategy",
            field=fields.CharField(null=True, max_length=64),
        ),
        AddDecisionColumn(
            model_name="UsageRecord",
            name="chosen",
            field=fields.CharField(null=True, max_length=400),
        ),
        AddDecisionColumn(
            model_name="UsageRecord",
            name="route_reason",
            field=fields.TextField(null=True, unique=False),
        ),
        AddDecisionColumn(
            model_name="UsageRecord",
            name="candidates",
            field=fields.JSONField(null=True, encoder=JSON_DUMPS, decoder=loads),
        ),
        AddDecisionColumn(
            model_name="UsageRecord",
            name="fallbacks",
            field=fields.JSONField(null=True, encoder=JSON_DUMPS, decoder=loads),
        ),
        AddDecisionColumn(
            model_name="UsageRecord",
            name="fell_back",
            field=fields.BooleanField(default=False, db_default=False),
        ),
        AddDecisionColumn(
            model_name="UsageRecord",
            name="outcome",
            field=fields.CharField(null=True, max_length=64),
        ),
        ops.RunPython(fold_decisions_in, split_decisions_out),
        ops.DeleteModel(name="RoutingDecisionRecord"),
    ]
