"""The data model (Tortoise ORM). One module, used by storage, security, routing, ops and admin.

Identity: :class:`Team` ← :class:`User` ← :class:`ApiKey` (a key may belong to a user, a team,
both or neither). Limits and budgets sit on each level (None: no limit at that level).
Facts: :class:`UsageRecord` (one per request, carrying the request's routing decision when it was
routed), rolled up into :class:`UsageRollup` and :class:`ModelMetric` per hour and day; ops adds
:class:`ProviderHealthCheck`, :class:`AlertSent` and :class:`JobRun`.
"""

from __future__ import annotations

from typing import Any

from tortoise import fields
from tortoise.models import Model

BUDGET_PERIODS = ("daily", "weekly", "monthly", "total")


class LimitsMixin:
    """Rate limits and a budget; the same fields on teams, users and keys."""

    rpm = fields.IntField(null=True)  # requests per minute
    tpm = fields.IntField(null=True)  # tokens per minute
    max_parallel = fields.IntField(null=True)  # concurrent requests
    budget_usd = fields.DecimalField(max_digits=14, decimal_places=6, null=True)
    budget_period = fields.CharField(max_length=16, default="monthly")  # BUDGET_PERIODS


class Team(LimitsMixin, Model):
    id = fields.CharField(primary_key=True, max_length=64)
    name = fields.CharField(max_length=200, unique=True)
    allowed_models: fields.JSONField[Any] = fields.JSONField(null=True)  # list of aliases; None: all
    metadata: fields.JSONField[Any] = fields.JSONField(default=dict)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "teams"


class User(LimitsMixin, Model):
    id = fields.CharField(primary_key=True, max_length=64)
    email = fields.CharField(max_length=320, unique=True, null=True)
    name = fields.CharField(max_length=200, default="")
    team: fields.ForeignKeyNullableRelation[Team] = fields.ForeignKeyField(
        "models.Team", related_name="users", null=True, on_delete=fields.SET_NULL
    )
    roles: fields.JSONField[Any] = fields.JSONField(default=list)  # subset of admin, operator, viewer, user
    allowed_models: fields.JSONField[Any] = fields.JSONField(null=True)
    metadata: fields.JSONField[Any] = fields.JSONField(default=dict)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "users"


class ApiKey(LimitsMixin, Model):
    """A virtual key. Only the SHA-256 of the secret is stored, ``prefix`` is kept for display."""

    id = fields.CharField(primary_key=True, max_length=64)
    key_hash = fields.CharField(max_length=64, unique=True)  # hex sha256 of the full key
    prefix = fields.CharField(max_length=32)  # e.g. "sk-lg-AbCd" — never enough to use the key
    name = fields.CharField(max_length=200, default="")
    user: fields.ForeignKeyNullableRelation[User] = fields.ForeignKeyField(
        "models.User", related_name="keys", null=True, on_delete=fields.SET_NULL
    )
    team: fields.ForeignKeyNullableRelation[Team] = fields.ForeignKeyField(
        "models.Team", related_name="keys", null=True, on_delete=fields.SET_NULL
    )
    roles: fields.JSONField[Any] = fields.JSONField(default=list)  # empty: ["user"]
    allowed_models: fields.JSONField[Any] = fields.JSONField(null=True)
    metadata: fields.JSONField[Any] = fields.JSONField(default=dict)
    expires_at = fields.DatetimeField(null=True)
    revoked_at = fields.DatetimeField(null=True, db_index=True)
    created_at = fields.DatetimeField(auto_now_add=True)
    last_used_at = fields.DatetimeField(null=True)

    class Meta:
        table = "api_keys"


class UsageRecord(Model):
    """One row per request (success, error, cache hit or client disconnect).

    A routed request's row carries its routing decision (``strategy`` … ``outcome``; NULL, and
    ``fell_back`` false, for a request that was not routed): one insert per request. Migration 0005
    folded the former ``routing_decisions`` table in."""

    id = fields.BigIntField(primary_key=True)
    request_id = fields.CharField(max_length=64, unique=True)
    created_at = fields.DatetimeField(db_index=True)  # when the request started (UTC)
    hour = fields.IntField(default=0, db_default=0)  # created_at as whole hours since 1970 (UTC): portable bucketing
    endpoint = fields.CharField(max_length=32)
    key_id = fields.CharField(max_length=64, null=True)
    user_id = fields.CharField(max_length=64, null=True)
    team_id = fields.CharField(max_length=64, null=True)
    alias = fields.CharField(max_length=200, null=True)
    provider = fields.CharField(max_length=200, null=True)
    deployment = fields.CharField(max_length=400, null=True)
    upstream_model = fields.CharField(max_length=200, null=True)
    prompt_tokens = fields.IntField(default=0)
    completion_tokens = fields.IntField(default=0)
    cached_tokens = fields.IntField(default=0)
    reasoning_tokens = fields.IntField(default=0)
    usage_estimated = fields.BooleanField(default=False)
    cost = fields.DecimalField(max_digits=14, decimal_places=8, null=True)
    saved_cost = fields.DecimalField(max_digits=14, decimal_places=8, null=True)
    latency_ms = fields.FloatField()
    ttft_ms = fields.FloatField(null=True)
    status = fields.IntField()
    error_code = fields.CharField(max_length=64, null=True)
    cache_hit = fields.BooleanField(default=False)
    streamed = fields.BooleanField(default=False)
    client_disconnected = fields.BooleanField(default=False)
    attempts = fields.IntField(default=1)
    metadata: fields.JSONField[Any] = fields.JSONField(default=dict)
    # the routing decision (all NULL, fell_back false, for a request that was not routed)
    strategy = fields.CharField(max_length=64, null=True)
    # the deployment the router ranked first; ``deployment`` is the one that finally answered
    chosen = fields.CharField(max_length=400, null=True)
    route_reason = fields.TextField(null=True)
    candidates: fields.JSONField[Any] = fields.JSONField(null=True)  # [[deployment id, score], ...] best first
    fallbacks: fields.JSONField[Any] = fields.JSONField(null=True)  # deployments tried after the first
    fell_back = fields.BooleanField(default=False, db_default=False)  # another deployment was tried
    outcome = fields.CharField(max_length=64, null=True)  # "success" or the error code / status

    class Meta:
        table = "usage_records"
        indexes = (
            ("hour",),  # rollups and retention select whole hours
            ("key_id", "created_at"),
            ("team_id", "created_at"),
            ("user_id", "created_at"),
            ("alias", "created_at"),
            ("provider", "created_at"),
        )


class UsageRollup(Model):
    """Usage aggregated per bucket and dimension set: what dashboards read for long ranges."""

    id = fields.BigIntField(primary_key=True)
    bucket = fields.CharField(max_length=8)  # "hour" | "day"
    bucket_start = fields.DatetimeField()
    # the grouping set: which of the dimension columns below this row is grouped by ("" = the total,
    # "team_id,alias,provider", ...; see retention.ROLLUP_SETS); the others are NULL
    dims = fields.CharField(max_length=64, default="", db_default="")
    key_id = fields.CharField(max_length=64, null=True)
    user_id = fields.CharField(max_length=64, null=True)
    team_id = fields.CharField(max_length=64, null=True)
    alias = fields.CharField(max_length=200, null=True)
    provider = fields.CharField(max_length=200, null=True)
    requests = fields.IntField(default=0)
    errors = fields.IntField(default=0)
    cache_hits = fields.IntField(default=0)
    prompt_tokens = fields.BigIntField(default=0)
    completion_tokens = fields.BigIntField(default=0)
    cached_tokens = fields.BigIntField(default=0, db_default=0)
    cost = fields.DecimalField(max_digits=16, decimal_places=8, default=0)
    saved_cost = fields.DecimalField(max_digits=16, decimal_places=8, default=0, db_default=0)

    class Meta:
        table = "usage_rollups"
        indexes = (("bucket", "bucket_start"), ("bucket", "dims", "bucket_start"))
        # (from 0001; NULLs never collide in a unique constraint, so the cleanup job's transaction, not
        # this constraint, keeps one row per bucket and group)
        unique_together = (("bucket", "bucket_start", "key_id", "user_id", "team_id", "alias", "provider"),)


class ModelMetric(Model):
    """Per-deployment performance per bucket: read by the latency router and the admin API."""

    id = fields.BigIntField(primary_key=True)
    bucket = fields.CharField(max_length=8)
    bucket_start = fields.DatetimeField()
    alias = fields.CharField(max_length=200)
    provider = fields.CharField(max_length=200)
    deployment = fields.CharField(max_length=400)
    requests = fields.IntField(default=0)
    errors = fields.IntField(default=0)
    prompt_tokens = fields.BigIntField(default=0)
    completion_tokens = fields.BigIntField(default=0)
    cost = fields.DecimalField(max_digits=16, decimal_places=8, default=0)
    latency_p50_ms = fields.FloatField(null=True)
    latency_p95_ms = fields.FloatField(null=True)
    latency_p99_ms = fields.FloatField(null=True)
    ttft_p50_ms = fields.FloatField(null=True)
    ttft_p95_ms = fields.FloatField(null=True)

    class Meta:
        table = "model_metrics"
        unique_together = (("bucket", "bucket_start", "deployment"),)


class ProviderHealthCheck(Model):
    id = fields.BigIntField(primary_key=True)
    created_at = fields.DatetimeField(db_index=True)
    provider = fields.CharField(max_length=200)
    deployment = fields.CharField(max_length=400, null=True)
    ok = fields.BooleanField()
    latency_ms = fields.FloatField(null=True)
    error = fields.TextField(null=True)

    class Meta:
        table = "provider_health_checks"
        indexes = (("provider", "created_at"),)


class AlertSent(Model):
    id = fields.BigIntField(primary_key=True)
    created_at = fields.DatetimeField(db_index=True)
    rule = fields.CharField(max_length=200)
    fingerprint = fields.CharField(max_length=128, db_index=True)  # de-duplication key
    severity = fields.CharField(max_length=16)
    channel = fields.CharField(max_length=32)  # email | webhook
    message = fields.TextField()

    class Meta:
        table = "alerts_sent"


class JobRun(Model):
    """One run of a background job. The (job, scheduled_for) pair is the one-replica lock."""

    id = fields.BigIntField(primary_key=True)
    job = fields.CharField(max_length=100)
    scheduled_for = fields.DatetimeField()
    started_at = fields.DatetimeField()
    finished_at = fields.DatetimeField(null=True)
    status = fields.CharField(max_length=16)  # running | ok | failed
    replica = fields.CharField(max_length=200)
    message = fields.TextField(default="")

    class Meta:
        table = "job_runs"
        unique_together = (("job", "scheduled_for"),)
