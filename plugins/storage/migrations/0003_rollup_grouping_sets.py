"""Usage rollups per grouping set instead of one row per combination of every dimension.

A rollup row keyed by (key, user, team, model, provider) all at once hardly aggregates anything
(every key is its own row), so charts over 30 days still read about as many rows as the raw table.
From here on each bucket holds one row per value of a few *grouping sets* (``dims``): the total,
per model and provider, per team, per team and model, per user, per key (with their owners).
Existing rollups are regrouped into those sets in SQL; rolling back deletes the rollups (the next
``llmgateway db cleanup`` rebuilds those still covered by raw rows).
"""

from typing import Any

from tortoise import fields, migrations
from tortoise.indexes import Index
from tortoise.migrations import operations as ops

# A frozen copy: a migration must keep doing what it did when it shipped.
SETS = {
    "": (),
    "alias,provider": ("alias", "provider"),
    "team_id": ("team_id",),
    "team_id,alias,provider": ("team_id", "alias", "provider"),
    "user_id,team_id": ("user_id", "team_id"),
    "key_id,user_id,team_id": ("key_id", "user_id", "team_id"),
}
SUMS = (
    "requests",
    "errors",
    "cache_hits",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost",
    "saved_cost",
)


async def regroup(apps: Any, schema_editor: Any) -> None:
    client = schema_editor.client
    await client.execute_script("UPDATE usage_rollups SET dims = '*'")
    sums = ", ".join(f"SUM({s})" for s in SUMS)
    for dims, columns in SETS.items():
        cols = "".join(f", {c}" for c in columns)
        await client.execute_script(
            f"INSERT INTO usage_rollups (bucket, bucket_start, dims{cols}, {', '.join(SUMS)}) "  # noqa: S608
            f"SELECT bucket, bucket_start, '{dims}'{cols}, {sums} FROM usage_rollups WHERE dims = '*' "
            f"GROUP BY bucket, bucket_start{cols}"
        )
    await client.execute_script("DELETE FROM usage_rollups WHERE dims = '*'")


async def forget(apps: Any, schema_editor: Any) -> None:
    await schema_editor.client.execute_script("DELETE FROM usage_rollups")


class Migration(migrations.Migration):
    dependencies = [("models", "0002_usage_hour_rollup_savings_unique_decisions")]

    initial = False

    operations = [
        ops.AddField(
            model_name="UsageRollup",
            name="dims",
            field=fields.CharField(default="", db_default="", max_length=64),
        ),
        ops.RunPython(regroup, forget),
        ops.AddIndex(
            model_name="UsageRollup",
            index=Index(fields=["bucket", "dims", "bucket_start"]),
        ),
    ]
