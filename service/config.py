"""One settings object for the whole service: defaults < config file (TOML/YAML) < `DENSE_*` env < CLI flags."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

CONFIG_ENV = "DENSE_CONFIG"


def _split_list(value: Any) -> Any:
    """Env lists may be JSON (`["a","b"]`) or comma-separated (`a,b`)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [v.strip() for v in text.split(",") if v.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of `dense-serve serve`; each is documented in docs/configuration.md's table."""

    model_config = SettingsConfigDict(env_prefix="DENSE_", extra="forbid", validate_default=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="model specs to serve: spec .toml files, diffusers folders, shipped ids or hub ids",
    )
    probes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="probe folders (dense-serve probe train) served at /v1/segment beside their base models",
    )
    device: str | None = Field(default=None, description="override every spec's device (auto, cpu, cuda:N)")
    dtype: Literal["auto", "fp16", "fp32"] | None = None
    backend: Literal["auto", "torch", "onnxruntime", "tensorrt", "triton", "simulated"] | None = Field(
        default=None, description="override every spec's runtime; exported ones export checkpoints on first start"
    )
    engine_cache: Path = Field(
        default=Path(".cache/engines"), description="exports and TensorRT engines, keyed by checkpoint hash"
    )
    tiny_dir: Path = Field(default=Path(".cache/tiny"), description="where random tiny checkpoints are built")

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_keys_dir: Path | None = Field(
        default=None,
        description="a directory of key files, one key per file (a mounted Kubernetes Secret); re-read as it "
        "changes, so keys rotate without a restart",
    )
    api_keys_reload_s: float = Field(
        default=2.0, gt=0, description="how often api_keys_dir is checked for changed keys (at most)"
    )
    auth: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="auto: `api` and `grpc` refuse to start without API keys, `serve` too unless bound to loopback; "
        "on: keys required everywhere; off: no keys checked, on purpose (--no-auth)",
    )
    auth_exempt_health: bool = Field(default=True, description="/healthz, /readyz and /metrics without a key")
    web_page: bool = Field(default=True, description="serve the demo page at GET / (and its files at /ui/)")
    auth_exempt_web_page: bool = Field(
        default=True, description="the demo page's static files without a key (the page asks for one itself)"
    )

    max_upload_bytes: int = Field(default=20 * 2**20, ge=1024)
    max_pixels: int = Field(default=40_000_000, ge=1)
    max_answer_bytes: int = Field(
        default=128 * 2**20,
        ge=1024,
        description="largest answer a request may ask for (its maps at their size and format, before compression); "
        "413 past it: every answer passes through the queue's memory",
    )
    max_processing_res: int = Field(default=2048, ge=8)
    default_timeout_ms: int = Field(default=30_000, ge=1)
    max_timeout_ms: int = Field(default=300_000, ge=1)
    http_limit_concurrency: int = Field(
        default=1024,
        ge=2,
        description="HTTP connections (keep-alive ones too, the asking one included) or requests at once before "
        "uvicorn answers 503",
    )
    grpc_max_concurrent_rpcs: int = Field(
        default=1024, ge=1, description="gRPC calls at once (a stream counts once) before RESOURCE_EXHAUSTED"
    )

    queue_max_jobs: int = Field(default=256, ge=1, description="jobs waiting per model before 429")
    max_batch_size: int = Field(default=8, ge=1)
    max_queue_delay_ms: float = Field(default=5.0, ge=0)
    uncertainty_max_seeds: int = Field(default=32, ge=2, le=32, description="the API's hard cap is 32")
    warmup: bool = Field(default=True, description="run one batch per model before reporting ready")
    io_threads: int = Field(
        default_factory=lambda: os.cpu_count() or 4,
        ge=1,
        description="threads for image decode and output encode (default: one per CPU core)",
    )
    png_compression: int = Field(
        default=1, ge=0, le=9, description="PNG answers: 0-3 fast (ISA-L deflate), 4-9 smaller and slower (zlib)"
    )
    jpeg_draft: bool = Field(
        default=True,
        description="decode a JPEG at a reduced DCT scale (1/2, 1/4, 1/8) while it stays >= 2x the processing size",
    )
    tiff_compression: Literal["deflate", "zstd", "none"] = Field(
        default="deflate", description="format=tiff answers: deflate (readable everywhere) or zstd (faster)"
    )
    http_compression: bool = Field(
        default=True, description="compress NPY and JSON answers when the client sends Accept-Encoding zstd/gzip"
    )
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        default="text", description="json: one object per line with request_id and traceparent"
    )
    otel_enabled: bool = Field(default=False, description="OpenTelemetry spans per request and job (otel extra)")
    otel_endpoint: str | None = Field(
        default=None, description="OTLP/HTTP traces endpoint (default: the OTEL_EXPORTER_OTLP_* environment)"
    )
    metrics_enabled: bool = Field(default=True, description="serve Prometheus metrics at /metrics")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="worker processes: serve /metrics on this port"
    )
    metrics_interval_s: float = Field(default=2.0, gt=0, description="how often queue and GPU gauges are sampled")

    grpc_enabled: bool = Field(default=True, description="run the gRPC front-end beside REST in `serve`")
    grpc_host: str | None = Field(default=None, description="gRPC bind address (default: host)")
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    grpc_max_in_flight: int = Field(default=16, ge=1, description="cap of a stream's in-flight window")
    grpc_default_in_flight: int = Field(default=4, ge=1, description="a stream's window unless it asks")

    queue: Literal["memory", "redis"] = Field(default="memory", description="embedded queue or Redis Streams")
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="redis:// or rediss:// (TLS); a password may be in the URL"
    )
    redis_password: SecretStr | None = Field(
        default=None, description="Redis password (AUTH); overrides one in the URL; keep it in a Secret"
    )
    redis_tls_ca_file: Path | None = Field(
        default=None, description="CA bundle that signed the Redis server's certificate (rediss:// URLs)"
    )
    redis_prefix: str = Field(default="dense", pattern=r"^[\w.-]+$", description="namespace of every key")
    stream_maxlen: int = Field(default=10_000, ge=100, description="approximate cap of each job stream")
    result_ttl_s: int = Field(
        default=60,
        ge=1,
        description="how long a keyed answer stays for a retry when its client left before it was delivered",
    )
    answer_grace_s: float = Field(
        default=5.0,
        ge=0,
        description="how long a keyed answer stays once delivered to its client (a retry after an answer lost "
        "in transit)",
    )
    answer_store_bytes: int = Field(
        default=64 * 2**20,
        ge=0,
        description="byte budget of all keyed answers kept for retries (per process, or per Redis deployment); "
        "past it an answer is not kept and a retry computes again",
    )
    min_idle_ms: int = Field(
        default=10_000,
        ge=100,
        description="reclaim a job from a worker that is alive but hung (its event loop stopped) after this long; "
        "a dead worker's jobs are reclaimed as soon as its heartbeat expires",
    )
    scale_from_zero: bool = Field(
        default=False,
        description="API: accept jobs for models whose workers are all scaled down (they wait for KEDA to start one)",
    )
    max_deliveries: int = Field(default=3, ge=1, description="tries before a job goes to the dead-letter stream")
    worker_name: str | None = Field(default=None, description="consumer name (default host-pid); keep it stable")
    heartbeat_s: float = Field(default=2.0, gt=0, description="worker heartbeat; its key lives 3 heartbeats")

    @field_validator("models", "probes", "api_keys", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("max_processing_res")
    @classmethod
    def _res_multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError("max_processing_res must be a multiple of 8")
        return v

    @model_validator(mode="after")
    def _timeouts_consistent(self) -> Settings:
        if self.default_timeout_ms > self.max_timeout_ms:
            raise ValueError(
                f"default_timeout_ms ({self.default_timeout_ms}) exceeds max_timeout_ms ({self.max_timeout_ms})"
            )
        return self

    @property
    def heartbeat_ttl_s(self) -> float:
        """A worker is dead once its heartbeat key, refreshed every `heartbeat_s`, has lived this long."""
        return 3 * self.heartbeat_s

    @model_validator(mode="after")
    def _recovery_before_deadline(self) -> Settings:
        """A crashed or hung worker's jobs must be reclaimable while their requests still wait for them."""
        if self.heartbeat_ttl_s * 1000 >= self.default_timeout_ms:
            raise ValueError(
                f"heartbeat_s ({self.heartbeat_s}) gives a heartbeat TTL of {self.heartbeat_ttl_s:g} s, not below "
                f"default_timeout_ms ({self.default_timeout_ms} ms): a dead worker's jobs would be reclaimed only "
                "after their requests gave up; lower heartbeat_s or raise default_timeout_ms"
            )
        if self.min_idle_ms >= self.default_timeout_ms:
            raise ValueError(
                f"min_idle_ms ({self.min_idle_ms}) is not below default_timeout_ms ({self.default_timeout_ms}): a "
                "hung worker's jobs would be reclaimed only after their requests gave up; lower min_idle_ms"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get(CONFIG_ENV)
        if path:
            suffix = Path(path).suffix.lower()
            if suffix == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            elif suffix in (".yaml", ".yml"):
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
            else:
                raise ValueError(f"config file must be .toml, .yaml or .yml: {path}")
        return tuple(sources)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from an optional file, the environment, then explicit overrides (CLI flags)."""
    previous = os.environ.get(CONFIG_ENV)
    if config_file is not None:
        if not Path(config_file).is_file():
            raise FileNotFoundError(f"config file not found: {config_file}")
        os.environ[CONFIG_ENV] = str(config_file)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        if config_file is not None:
            if previous is None:
                os.environ.pop(CONFIG_ENV, None)
            else:
                os.environ[CONFIG_ENV] = previous
