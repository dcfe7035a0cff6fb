"""An index on ``usage_records.hour``: the cleanup job's rollups and retention select whole hours
(without it every rollup query and the retention delete scan the whole table)."""

from tortoise import migrations
from tortoise.indexes import Index
from tortoise.migrations import operations as ops


class Migration(migrations.Migration):
    dependencies = [("models", "0003_rollup_grouping_sets")]

    initial = False

    operations = [
        ops.AddIndex(
            model_name="UsageRecord",
            index=Index(fields=["hour"]),
        ),
    ]
