"""sync's settings: the seed's variable names and the device list."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from services.sync.config import SyncSettings, parse_devices, parse_modalities


def test_seed_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_SYNC_INTERVAL", "0.5")
    monkeypatch.setenv("OPENROUTER_TOP_N", "100")
    monkeypatch.setenv("OPENROUTER_MAX_PRICE_PER_1M", "100.0")
    monkeypatch.setenv("OPENROUTER_SYNC_ON_STARTUP", "1")
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-secret")
    monkeypatch.setenv(
        "OLLAMA_DEVICES", "gpu-box=http://10.0.0.5:11434/, laptop=http://127.0.0.1:11434"
    )
    s = SyncSettings()
    assert s.openrouter_sync_interval == 0.5
    assert s.openrouter_top_n == 100
    assert s.openrouter_max_price_per_1m == Decimal("100.0")
    assert s.openrouter_sync_on_startup is True
    assert s.ollama_devices == {
        "gpu-box": "http://10.0.0.5:11434",
        "laptop": "http://127.0.0.1:11434",
    }
    assert "sk-or-secret" not in repr(s) and "sk-or-secret" not in str(s.model_dump())


@pytest.mark.parametrize(
    "text",
    [
        "gpu-box",
        "gpu-box=10.0.0.5:11434",
        "=http://x",
        "a=http://x,a=http://y",
        "bad name=http://x",
    ],
)
def test_a_wrong_device_list_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="OLLAMA_DEVICES"):
        parse_devices(text)
    with pytest.raises(ValidationError):
        SyncSettings(ollama_devices=text)


def test_empty_device_list_and_bad_rank_key() -> None:
    assert parse_devices("") == {} == parse_devices(" , ")
    with pytest.raises(ValidationError):
        SyncSettings(openrouter_rank_by="popularity")


def test_output_modalities_and_the_fetch_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    default = SyncSettings()
    assert default.openrouter_output_modalities == {"text"}
    assert 0 < default.openrouter_timeout_s < default.openrouter_fetch_deadline_s
    monkeypatch.setenv("OPENROUTER_OUTPUT_MODALITIES", " Text, image ,,embeddings")
    monkeypatch.setenv("OPENROUTER_FETCH_DEADLINE_S", "45")
    s = SyncSettings()
    assert s.openrouter_output_modalities == {"text", "image", "embeddings"}
    assert s.openrouter_fetch_deadline_s == 45


@pytest.mark.parametrize("text", ["", " , ", "text;image", "te xt", "text,\x00"])
def test_a_wrong_modality_list_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="OPENROUTER_OUTPUT_MODALITIES"):
        parse_modalities(text)
    with pytest.raises(ValidationError):
        SyncSettings(openrouter_output_modalities=text)


@pytest.mark.parametrize("seconds", ["0", "-1", "nan"])
def test_the_fetch_deadline_is_a_positive_time(seconds: str) -> None:
    with pytest.raises(ValidationError):
        SyncSettings(openrouter_fetch_deadline_s=seconds)
