"""What the write-behind queue and the dashboards need on top of the first schema.

* ``usage_records.hour``: the start time as whole hours since 1970 (UTC), so every database groups
  by hour and day with plain integer arithmetic; filled in for existing rows.
* ``routing_decisions.request_id`` unique: a spooled batch replayed after an outage inserts each
  decision at most once (duplicates left by older versions are removed first).
* ``routing_decisions.fell_back``: whether another deployment was tried (the fallback rate).
* ``usage_rollups.cached_tokens`` and ``saved_cost``: prompt caching and response-cache savings.
"""

from typing import Any

from tortoise import fields, migrations
from tortoise.migrations import operations as ops


async def backfill(apps: Any, schema_editor: Any) -> None:
    client = schema_editor.client
    if schema_editor.DIALECT == "postgres":
        hour = "CAST(FLOOR(EXTRACT(EPOCH FROM created_at) / 3600) AS INTEGER)"
        fell_back = "jsonb_array_length(fallbacks::jsonb) > 0"
    elif schema_editor.DIALECT == "sqlite":
        hour = "CAST(strftime('%s', created_at) AS INTEGER) / 3600"
        fell_back = "json_array_length(fallbacks) > 0"
    else:  # MySQL / SQL Server (untested)
        hour = "FLOOR(DATEDIFF(second, '1970-01-01', created_at) / 3600)"
        fell_back = "fallbacks <> '[]'"
    await client.execute_script(f"UPDATE usage_records SET hour = {hour}")  # noqa: S608 - constant SQL
    await client.execute_script(f"UPDATE routing_decisions SET fell_back = {fell_back}")  # noqa: S608


async def drop_duplicate_decisions(apps: Any, schema_editor: Any) -> None:
    await schema_editor.client.execute_script(
        "DELETE FROM routing_decisions WHERE id NOT IN "
        "(SELECT keep FROM (SELECT MIN(id) AS keep FROM routing_decisions GROUP BY request_id) AS firsts)"
    )


class Migration(migrations.Migration):
    dependencies = [("models", "0001_initial")]

    initial = False

    operations = [
        ops.RunPython(drop_duplicate_decisions, ops.RunPython.noop),
        ops.AlterField(
            model_name="RoutingDecisionRecord",
            name="request_id",
            field=fields.CharField(unique=True, max_length=64),
        ),
        ops.AddField(
            model_name="RoutingDecisionRecord",
            name="fell_back",
            field=fields.BooleanField(default=False, db_default=False),
        ),
        ops.AddField(
            model_name="UsageRecord",
            name="hour",
            field=fields.IntField(default=0, db_default=0),
        ),
        ops.AddField(
            model_name="UsageRollup",
            name="cached_tokens",
            field=fields.BigIntField(default=0, db_default=0),
        ),
        ops.AddField(
            model_name="UsageRollup",
            name="saved_cost",
            field=fields.DecimalField(default=0, db_default=0, max_digits=16, decimal_places=8),
        ),
        ops.RunPython(backfill, ops.RunPython.noop),
    ]
