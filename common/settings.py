"""All settings, read from DIFFBATCH_* environment variables; the embedded defaults need none."""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.lines import DiffusionOptions

BUILTIN_MODEL = "builtin"
# The checkpoint this project trained and ships (package data of worker.engine.builtin; only its
# path is named here, nothing is imported).
BUILTIN_MODEL_PATH = Path(__file__).resolve().parent.parent / "worker" / "engine" / "builtin" / "diffbatch-py-mini"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIFFBATCH_", extra="ignore")

    data_dir: Path = Path("diffbatch-data")
    database_url: str | None = None  # default: SQLite file in data_dir
    broker_url: str | None = None  # default: kombu's SQLAlchemy transport on a SQLite file in data_dir
    model: str = BUILTIN_MODEL  # a local checkpoint folder, or "builtin"
    model_name: str | None = None  # the name clients put in body.model; default: the folder name
    device: str = "cpu"
    dtype: str = "auto"
    trust_remote_code: bool = False
    max_batch_size: int = 32
    # The engine's KV cache: None = the family's exact/fastest default ("exact" block-causal, "dual"
    # full attention); "delayed" (block-causal, approximate inside the active block), "prefix",
    # "none". DiffusionGemma has its own cache and ignores it.
    cache: Literal["exact", "delayed", "prefix", "dual", "none"] | None = None
    # On a CUDA device, capture each round's denoising step as a CUDA graph (block-causal models with
    # the exact cache; worker/engine/cuda_graph.py). False runs every step eagerly.
    cuda_graphs: bool = True
    # The body.diffusion options a request leaves unset, as JSON (e.g. '{"sampler": "threshold",
    # "threshold": 0.7, "editing_threshold": 0.5}' to serve LLaDA2.1 with its own decoding to clients
    # that send plain OpenAI bodies); None: the checkpoint's defaults (docs/models.md).
    diffusion: dict[str, Any] | None = None
    chunk_size: int = 64  # requests per Celery message
    # Chunks a run may lease beyond its first to keep the engine's batch full across chunk boundaries
    # (worker/feed.py); 0, the default: one chunk a run. Off until a benchmark shows it pays (on the tiny
    # model, mixed lengths, both gave 0.93 of the engine alone: docs/benchmarks.md).
    feed_ahead_chunks: int = Field(default=0, ge=0, le=8)
    max_attempts: int = 3  # failed runs of a request on its own before it ends as max_attempts_exceeded
    heartbeat_s: int = 10  # a worker beats its `workers` row this often (and while it runs a chunk)
    worker_dead_after_s: int = 30  # a worker whose row beat longer ago is dead: its chunks are reclaimed
    lost_message_grace_s: int = 15  # an unheld chunk sent this long ago, with its queue empty, is re-sent
    stale_after_s: int = 120  # a validation or finalizer quiet this long is retried
    requeue_after_s: int = 600  # last resort: a chunk with pending requests is enqueued again after this
    reconcile_every_s: int = 10
    control_concurrency: int = 4  # tasks the control process runs at once (validations, finalizing, reconciling)
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    dedupe_window_s: int = 10  # identical batch creates this close together return the first batch
    # -- limits (OpenAI's where it has one) -------------------------------------------------------
    # OpenAI's 200 MB batch input file (MiB here), counted while the upload streams; larger is a 413.
    max_upload_bytes: int = Field(200 * 1024 * 1024, ge=1)
    max_batch_requests: int = Field(50_000, ge=1)  # request lines in one batch, as OpenAI
    # One input line, checked in bytes before it is parsed or tokenized. No prompt that fits a served
    # context can reach it: 131,072 positions x 16 bytes a token x 6 bytes per JSON-escaped byte is 12.6 MB.
    max_line_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # Validations of one batch started before it fails instead (a validator that keeps dying on it).
    max_validation_attempts: int = Field(3, ge=1)
    validation_touch_s: float = Field(5.0, gt=0)  # validation shows its batch it is alive at least this often
    # -- retention -------------------------------------------------------------------------------
    # Files (uploads, outputs) without an expiry of their own are deleted this long after creation; 0 keeps them.
    retention_days: int = Field(30, ge=0)
    retention_every_s: int = Field(600, ge=1)  # how often expired files and leftover partial blobs are deleted
    # Per tenant (a tenant's own limits, `diffbatch tenants set`, win): requests of its batches still waiting or
    # running, and their token budgets (prompt + max_tokens); a create past either is a 429 quota_exceeded.
    max_queued_requests: int = Field(1_000_000, ge=0)
    max_queued_tokens: int = Field(1_000_000_000, ge=0)
    # -- webhooks (worker/webhooks.py) ----------------------------------------------------------
    # Signs every webhook call (Standard Webhooks): "whsec_" + base64 of 24 to 64 random bytes. Needed by the
    # API and the control worker once a batch names a webhook_url; without it such a create is a 400.
    webhook_secret: SecretStr | None = None
    webhook_every_s: float = Field(5.0, gt=0)  # how often the control worker sends due webhook deliveries
    # -- metrics (common/metrics.py) -------------------------------------------------------------
    # A worker or control process serves its own Prometheus metrics on this port (None: only through the
    # API's /metrics, which adds up the processes of one host via PROMETHEUS_MULTIPROC_DIR). No key: counts only.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    metrics_host: str = "0.0.0.0"  # the address that port listens on
    # -- schedules (worker/schedules.py) ----------------------------------------------------------
    schedules_every_s: float = Field(15.0, gt=0)  # how often beat fires due schedules (a run starts this late at most)
    # -- files across hosts (common/s3_storage.py) ------------------------------------------------
    # Blobs in an S3-compatible store, e.g. "s3://bucket/prefix?endpoint_url=http://127.0.0.1:9000&region=us-east-1"
    # (credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); None: files_dir on local disk.
    files_url: str | None = None

    _diffusion_defaults: DiffusionOptions | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _diffusion_defaults_are_options(self) -> Settings:
        """Checked once, at startup, naming the variable and the field; then read per request."""
        if self.diffusion is None:
            return self
        if "template" in self.diffusion:
            raise ValueError("DIFFBATCH_DIFFUSION: template is a request's own, not a default")
        try:
            self._diffusion_defaults = DiffusionOptions.model_validate(self.diffusion)
        except ValidationError as error:
            first = error.errors()[0]
            raise ValueError(f"DIFFBATCH_DIFFUSION: {'.'.join(map(str, first['loc'])) or 'options'}: "
                             f"{first['msg']}") from None
        return self

    @property
    def diffusion_defaults(self) -> DiffusionOptions | None:
        return self._diffusion_defaults

    @model_validator(mode="after")
    def _chunk_fills_a_batch(self) -> Settings:
        # A chunk smaller than a forward batch caps the batch: measured 0.75 vs 0.80 of engine speed.
        if self.chunk_size < self.max_batch_size:
            raise ValueError(f"DIFFBATCH_CHUNK_SIZE ({self.chunk_size}) must be at least "
                             f"DIFFBATCH_MAX_BATCH_SIZE ({self.max_batch_size})")
        return self

    @model_validator(mode="after")
    def _beats_before_death(self) -> Settings:
        # A worker must beat at least once before it is taken for dead, or every running chunk is reclaimed.
        if self.worker_dead_after_s <= self.heartbeat_s:
            raise ValueError(f"DIFFBATCH_WORKER_DEAD_AFTER_S ({self.worker_dead_after_s}) must be more than "
                             f"DIFFBATCH_HEARTBEAT_S ({self.heartbeat_s})")
        return self

    @property
    def webhook_key(self) -> bytes | None:
        """The HMAC key of DIFFBATCH_WEBHOOK_SECRET (its base64 part, decoded); None when unset."""
        if self.webhook_secret is None:
            return None
        encoded = self.webhook_secret.get_secret_value().removeprefix("whsec_")
        return base64.b64decode(encoded, validate=True)

    @model_validator(mode="after")
    def _webhook_secret_format(self) -> Settings:
        if self.webhook_secret is None:
            return self
        try:
            size = len(self.webhook_key or b"") if self.webhook_secret.get_secret_value().startswith("whsec_") else 0
        except binascii.Error:
            size = 0
        if not 24 <= size <= 64:
            raise ValueError("DIFFBATCH_WEBHOOK_SECRET must be 'whsec_' followed by the base64 of 24 to 64 random "
                             "bytes, e.g. the output of: python -c \"import base64, os; "
                             "print('whsec_' + base64.b64encode(os.urandom(32)).decode())\"")
        return self

    @model_validator(mode="after")
    def _files_url_is_s3(self) -> Settings:
        if self.files_url:
            from common.s3_storage import parse_files_url  # imports botocore: only where S3 is used

            parse_files_url(self.files_url)  # a ValueError naming DIFFBATCH_FILES_URL
        return self

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'diffbatch.sqlite').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def model_path(self) -> Path:
        if self.model == BUILTIN_MODEL:
            return BUILTIN_MODEL_PATH
        return Path(self.model)

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.model_path.name


def queue_for_model(model_name: str) -> str:
    """One queue per model, so a worker only receives chunks for the model it holds."""
    return "diffbatch." + re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)


CONTROL_QUEUE = "diffbatch.control"
