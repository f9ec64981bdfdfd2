from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from services.runtime.config import RuntimeSettings
from services.sync.domain import RankKey

_DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_MODALITY = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def parse_modalities(text: str) -> frozenset[str]:
    """`text,image` → {"text", "image"}: the output modalities whose models are kept."""
    modalities = frozenset(filter(None, (part.strip().lower() for part in text.split(","))))
    bad = sorted(m for m in modalities if not _MODALITY.match(m))
    if not modalities or bad:
        raise ValueError(
            f"OPENROUTER_OUTPUT_MODALITIES: expected names such as text,image, got {text!r}"
        )
    return modalities


def parse_devices(text: str) -> dict[str, str]:
    """`gpu-box=http://10.0.0.5:11434,laptop=http://127.0.0.1:11434` → {name: base URL}."""
    devices: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, url = (s.strip() for s in item.partition("="))
        if not sep or not _DEVICE_NAME.match(name):
            raise ValueError(f"OLLAMA_DEVICES: expected name=http://host:port, got {item!r}")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"OLLAMA_DEVICES: {name}'s URL must start with http(s)://: {url!r}")
        if name in devices:
            raise ValueError(f"OLLAMA_DEVICES: device {name!r} is named twice")
        devices[name] = url.rstrip("/")
    return devices


class SyncSettings(RuntimeSettings):
    http_port: int = 8101

    openrouter_base_url: str = Field(
        "https://openrouter.ai", description="The catalog is GET {this}/api/v1/models."
    )
    openrouter_api_key: SecretStr | None = Field(
        None, description="Optional; sent as a bearer token, never logged."
    )
    openrouter_sync_interval: float = Field(
        24.0, gt=0, description="Hours between catalog syncs (fractions allowed)."
    )
    # Off by default so that a bare `make up` (and its tests) never reaches the internet;
    # the seed's deployment sets it to 1.
    openrouter_sync_on_startup: bool = Field(False, description="Also sync once at start.")
    openrouter_top_n: int = Field(100, ge=1, description="Models kept after ranking.")
    openrouter_max_price_per_1m: Decimal = Field(
        Decimal("100.0"),
        ge=0,
        description="USD per 1M tokens; a model is kept when its prompt and its completion "
        "price are both at most this.",
    )
    openrouter_rank_by: RankKey = Field(
        "context_length",
        description="context_length: largest context first, then cheapest; cheapest: lowest "
        "prompt + completion price first, then largest context; newest: latest `created` "
        "first. Remaining ties are broken by model id, so a ranking is reproducible.",
    )
    openrouter_include_variable_price: bool = Field(
        False,
        description='Keep router models whose price is "-1" (varies per request) although '
        "the price cap cannot be checked for them.",
    )
    openrouter_output_modalities: Annotated[frozenset[str], NoDecode] = Field(
        frozenset({"text"}),
        description="Comma separated: a model is kept when everything it outputs "
        "(`architecture.output_modalities`) is listed. Models with other output than text "
        "(image, audio, video, embeddings, ...) are billed per image, second or request: "
        "when kept they carry those unit prices, never a per-token price, and are never free.",
    )
    openrouter_timeout_s: float = Field(
        30.0, gt=0, description="Per attempt, for connecting and between two reads."
    )
    openrouter_fetch_deadline_s: float = Field(
        120.0,
        gt=0,
        description="Total seconds a catalog fetch may take, every attempt and backoff "
        "included; a response still trickling in then fails the run.",
    )
    openrouter_retry_attempts: int = Field(
        4, ge=1, description="Attempts on network errors, 429 and 5xx before a run fails."
    )
    openrouter_retry_backoff_s: float = Field(
        1.0, gt=0, description="Scale of the exponential backoff (full jitter) between attempts."
    )
    openrouter_retry_max_backoff_s: float = Field(30.0, gt=0)

    ollama_devices: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Local Ollama devices: name=base URL, comma separated.",
    )
    ollama_discovery_interval: float = Field(60.0, gt=0, description="Seconds between checks.")
    ollama_timeout_s: float = Field(
        2.0, gt=0, description="A device that has not answered both requests by then is offline."
    )

    @field_validator("openrouter_output_modalities", mode="before")
    @classmethod
    def _modalities_from_text(cls, value: Any) -> Any:
        return parse_modalities(value) if isinstance(value, str) else value

    @field_validator("ollama_devices", mode="before")
    @classmethod
    def _devices_from_text(cls, value: Any) -> Any:
        return parse_devices(value) if isinstance(value, str) else value

    @field_validator("openrouter_base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")
