"""The pure rules of sync: reading OpenRouter's catalog, the price filter and ranking, what a
sync changes, and device transitions."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from typing import Any

import pytest

from contracts.events import DeviceOffline, DeviceOnline, ModelSynced
from services.sync.domain import (
    CatalogFormatError,
    DeviceCheck,
    Model,
    SelectionRules,
    StoredModel,
    diff,
    discovery_outcome,
    model_synced,
    parse_catalog,
    parse_tags,
    select,
    unavailable,
)
from tests.conftest import SHARED_DATA

OPENROUTER_DATA = SHARED_DATA / "openrouter"
needs_data = pytest.mark.skipif(
    not OPENROUTER_DATA.is_dir(), reason=f"real OpenRouter responses not found in {OPENROUTER_DATA}"
)
RUN = uuid.UUID("00000000-0000-0000-0000-0000000000aa")


def entry(
    model_id: str, prompt: Any = "0.000001", completion: Any = "0.000002", **extra: Any
) -> dict[str, Any]:
    e: dict[str, Any] = {
        "id": model_id,
        "name": extra.pop("name", model_id.title()),
        "created": extra.pop("created", 1750000000),
        "context_length": extra.pop("context_length", 128000),
        "pricing": {"prompt": prompt, "completion": completion},
        "top_provider": {"context_length": None, "max_completion_tokens": None},
    }
    e.update(extra)
    return e


def body(*entries: dict[str, Any]) -> bytes:
    return json.dumps({"data": list(entries)}).encode()


def model(model_id: str, prompt: str = "1", completion: str = "2", **kw: Any) -> Model:
    fields: dict[str, Any] = dict(
        provider="openrouter",
        model_id=model_id,
        name=model_id,
        context_length=1000,
        prompt_price_per_1m=Decimal(prompt),
        completion_price_per_1m=Decimal(completion),
    )
    return Model(**{**fields, **kw})


# --- reading ------------------------------------------------------------------------------


def test_prices_become_exact_decimals_per_million_tokens() -> None:
    parsed = parse_catalog(
        body(entry("a/b", "0.0000025", "0.000000035"), entry("a/free", "0", "0"))
    )
    a, free = parsed.models
    assert a.prompt_price_per_1m == Decimal("2.5") and str(a.prompt_price_per_1m) == "2.5"
    assert str(a.completion_price_per_1m) == "0.035"
    assert isinstance(a.prompt_price_per_1m, Decimal)
    assert (free.prompt_price_per_1m, free.completion_price_per_1m) == (Decimal(0), Decimal(0))
    assert (
        str(parse_catalog(body(entry("x", "0.00001", "0.00015"))).models[0].completion_price_per_1m)
        == "150"
    )


def test_minus_one_is_a_variable_price_with_no_number() -> None:
    [router] = parse_catalog(body(entry("openrouter/auto", "-1", "-1"))).models
    assert router.variable_price
    assert router.prompt_price_per_1m is None and router.completion_price_per_1m is None
    [half] = parse_catalog(body(entry("x/half", "0.000001", "-1"))).models
    assert half.variable_price


@pytest.mark.parametrize(
    ("pricing", "reason"),
    [
        ({"completion": "0.000001"}, "no prompt price"),
        ({"prompt": "0.000001"}, "no completion price"),
        ({"prompt": None, "completion": "0"}, "not a number"),
        ({"prompt": "abc", "completion": "0"}, "not a number"),
        ({"prompt": "-0.5", "completion": "0"}, "not a price"),
        ({"prompt": "NaN", "completion": "0"}, "not a price"),
    ],
)
def test_an_entry_whose_price_is_unknown_is_skipped_never_priced_zero(
    pricing: dict[str, Any], reason: str
) -> None:
    bad = entry("x/bad")
    bad["pricing"] = pricing
    parsed = parse_catalog(body(bad, entry("x/good")))
    assert [m.model_id for m in parsed.models] == ["x/good"]
    assert parsed.fetched == 2
    [skipped] = parsed.skipped
    assert skipped.model_id == "x/bad" and reason in skipped.reason


def test_omitted_zero_price_keys_nulls_and_unknown_fields_are_fine() -> None:
    e = entry("x/new", brand_new_field={"nested": [1, 2]}, knowledge_cutoff=None)
    e["pricing"]["input_cache_read"] = "0.0000001"  # no request/image/web_search keys
    e["context_length"] = None
    e["top_provider"] = {"context_length": 32768, "max_completion_tokens": None}
    [m] = parse_catalog(body(e)).models
    assert m.context_length == 32768  # falls back to the top provider's
    assert m.raw == e  # stored as it came, unknown fields included
    e2 = entry("x/none", top_provider=None)
    e2["context_length"] = None
    assert parse_catalog(body(e2)).models[0].context_length is None


def test_entries_without_id_and_duplicates_are_skipped() -> None:
    parsed = parse_catalog(body(entry("a"), {"name": "no id"}, "not an object", entry("a", "0.1")))  # type: ignore[arg-type]
    assert [m.model_id for m in parsed.models] == ["a"]
    assert parsed.models[0].prompt_price_per_1m == 1  # the first one is kept
    assert [s.model_id for s in parsed.skipped] == ["#1", "#2", "a"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"<html><body>502 Bad Gateway</body></html>", "not JSON"),
        (body(entry("a"), entry("b"))[:-40], "not JSON"),  # truncated
        (b'{"error": {"message": "rate limited"}}', "no `data`"),
        (b"[1, 2]", "no `data`"),
        (b'{"data": {"id": "a"}}', "not a list"),
        (b'{"data": []}', "empty"),
        (b'{"data": [{"id": "a"}, {"id": "b"}]}', "none of the 2 entries"),
        (b"\xff\xfe garbage", "not JSON"),
    ],
)
def test_a_body_that_is_not_the_catalog_fails_clearly(raw: bytes, message: str) -> None:
    with pytest.raises(CatalogFormatError, match=message):
        parse_catalog(raw)


@needs_data
@pytest.mark.parametrize("day", ["2025-07-29", "2026-03-13", "2026-04-02"])
def test_every_real_response_is_read_whole(day: str) -> None:
    raw = (OPENROUTER_DATA / f"{day}.json").read_bytes()
    entries = json.loads(raw)["data"]
    parsed = parse_catalog(raw)
    assert parsed.skipped == []
    assert parsed.fetched == len(parsed.models) == len(entries)
    variable = {m.model_id for m in parsed.models if m.variable_price}
    expected = {
        e["id"] for e in entries if "-1" in (e["pricing"]["prompt"], e["pricing"]["completion"])
    }
    assert variable == expected
    for m, e in zip(parsed.models, entries, strict=True):
        if not m.variable_price:
            assert m.prompt_price_per_1m == Decimal(e["pricing"]["prompt"]) * 1_000_000


# --- choosing -----------------------------------------------------------------------------


def test_the_price_cap_holds_for_prompt_and_completion_inclusive() -> None:
    models = [
        model("both-under", "1", "2"),
        model("at-cap", "5", "5"),
        model("prompt-over", "5.01", "1"),
        model("completion-over", "1", "6"),
        model(
            "router", variable_price=True, prompt_price_per_1m=None, completion_price_per_1m=None
        ),
    ]
    rules = SelectionRules(max_price_per_1m=Decimal(5), top_n=10)
    filtered, _ = select(models, rules)
    assert [m.model_id for m in filtered] == ["both-under", "at-cap"]
    with_router = SelectionRules(max_price_per_1m=Decimal(5), top_n=10, include_variable_price=True)
    assert "router" in [m.model_id for m in select(models, with_router)[0]]


def test_ranking_keys_and_ties_are_deterministic() -> None:
    models = [
        model("b", "1", "1", context_length=8000, created=3),
        model("a", "1", "1", context_length=8000, created=3),
        model("cheap", "0", "0", context_length=4000, created=1),
        model("big", "3", "3", context_length=1_000_000, created=2),
        model("none", "2", "2", context_length=None, created=None),
    ]
    cap = Decimal(100)

    def ranked(rank_by: Any, top_n: int = 10) -> list[str]:
        return [m.model_id for m in select(models, SelectionRules(cap, top_n, rank_by))[1]]

    assert ranked("context_length") == ["big", "a", "b", "cheap", "none"]
    assert ranked("cheapest") == ["cheap", "a", "b", "none", "big"]
    assert ranked("newest") == ["a", "b", "big", "cheap", "none"]
    assert ranked("context_length", top_n=2) == ["big", "a"]
    assert ranked("cheapest", top_n=2) == ranked("cheapest", top_n=2)


def test_the_selection_key_changes_with_any_rule() -> None:
    base = SelectionRules(Decimal("100.0"), 100)
    assert base.key == SelectionRules(Decimal("100"), 100).key
    assert (
        len(
            {
                base.key,
                SelectionRules(Decimal(10), 100).key,
                SelectionRules(Decimal(100), 5).key,
                SelectionRules(Decimal(100), 100, "newest").key,
                SelectionRules(Decimal(100), 100, include_variable_price=True).key,
            }
        )
        == 5
    )


# --- what changes -------------------------------------------------------------------------


def stored(*models: Model, status: Any = "active") -> dict[str, StoredModel]:
    return {m.model_id: StoredModel(m, status) for m in models}


def test_an_unchanged_list_changes_nothing() -> None:
    models = [model("a", raw={"id": "a"}), model("b", raw={"id": "b"})]
    assert diff(stored(*models), models) == []


def test_added_changed_removed_and_a_silent_refresh() -> None:
    current = (
        stored(
            model("same", raw={"v": 1}),
            model("price", "1", "2"),
            model("ctx"),
            model("renamed"),
            model("desc", raw={"description": "old"}),
            model("gone"),
        )
        | stored(model("back"), status="removed")
        | stored(model("long-gone"), status="removed")
    )
    seen = [
        model("same", raw={"v": 1}),
        model("price", "1", "2.5"),
        model("ctx", context_length=2000),
        model("renamed", name="New name"),
        model("desc", raw={"description": "new"}),
        model("back"),
        model("new"),
    ]
    changes = {c.model.model_id: c for c in diff(current, seen)}
    assert {k: (c.change, c.status) for k, c in changes.items()} == {
        "price": ("changed", "active"),
        "ctx": ("changed", "active"),
        "renamed": ("changed", "active"),
        "desc": (None, "active"),
        "back": ("added", "active"),
        "new": ("added", "active"),
        "gone": ("removed", "removed"),
    }
    assert {k for k, c in changes.items() if c.price_changed} == {"price", "new"}
    assert changes["gone"].model == model("gone")  # removed with its last known values


def test_equal_prices_written_differently_are_equal() -> None:
    assert diff(stored(model("a", "2.5", "10")), [model("a", "2.50000", "1E+1")]) == []


def test_events_only_for_told_changes_with_deterministic_ids() -> None:
    changes = diff(
        stored(model("gone"), model("desc", raw={"d": 1})),
        [model("desc", raw={"d": 2}), model("new")],
    )
    events = model_synced(changes, RUN)
    assert [(e.model_id, e.change, e.status) for e in events] == [
        ("new", "added", "active"),
        ("gone", "removed", "removed"),
    ]
    assert [e.event_id for e in events] == [e.event_id for e in model_synced(changes, RUN)]
    assert all(isinstance(e, ModelSynced) for e in events)
    variable = model(
        "r", variable_price=True, prompt_price_per_1m=None, completion_price_per_1m=None
    )
    [event] = model_synced(diff({}, [variable]), RUN)
    assert event.variable_price and event.prompt_price_per_1m is None


# --- devices ------------------------------------------------------------------------------

TAGS = {
    "models": [
        {
            "name": "llama3.1:8b",
            "model": "llama3.1:8b",
            "modified_at": "2026-03-01T10:00:00.000000+01:00",
            "size": 4920753328,
            "digest": "46e0c10c039e019119339687c3c1757cc81b9da49709a3b3924863ba87ca666e",
            "details": {
                "format": "gguf",
                "family": "llama",
                "parameter_size": "8.0B",
                "quantization_level": "Q4_K_M",
            },
        },
        {"name": "qwen2.5:7b", "model": "qwen2.5:7b", "size": 1, "digest": "x", "details": {}},
    ]
}


def test_ollama_tags_become_free_models_of_their_device() -> None:
    models = parse_tags("gpu-box", TAGS)
    assert [(m.provider, m.device, m.model_id) for m in models] == [
        ("ollama", "gpu-box", "llama3.1:8b"),
        ("ollama", "gpu-box", "qwen2.5:7b"),
    ]
    assert all(m.prompt_price_per_1m == 0 == m.completion_price_per_1m for m in models)
    assert models[0].raw["details"]["parameter_size"] == "8.0B"
    with pytest.raises(ValueError, match="models"):
        parse_tags("gpu-box", {"error": "nope"})


def online(device: str = "gpu-box") -> DeviceCheck:
    return DeviceCheck(device, "http://gpu:11434", version="0.6.1", models=parse_tags(device, TAGS))


def offline(device: str = "gpu-box") -> DeviceCheck:
    return DeviceCheck(device, "http://gpu:11434", error="no answer within 2s")


def kinds(outcome: Any) -> list[str]:
    return [type(e).__name__ for e in outcome.events if not isinstance(e, ModelSynced)]


def test_device_events_only_on_transitions() -> None:
    models = {"gpu-box": stored(*parse_tags("gpu-box", TAGS))}
    first = discovery_outcome({}, {}, [online()], RUN)
    assert kinds(first) == ["DeviceOnline"] and len(first.changes) == 2
    assert kinds(discovery_outcome({"gpu-box": "online"}, models, [online()], RUN)) == []
    down = discovery_outcome({"gpu-box": "online"}, models, [offline()], RUN)
    assert kinds(down) == ["DeviceOffline"]
    [event] = [e for e in down.events if isinstance(e, DeviceOffline)]
    assert event.reason == "no answer within 2s"
    assert {(c.model.model_id, c.status, c.change) for c in down.changes} == {
        ("llama3.1:8b", "unavailable", "changed"),
        ("qwen2.5:7b", "unavailable", "changed"),
    }
    still_down = {"gpu-box": stored(*parse_tags("gpu-box", TAGS), status="unavailable")}
    again = discovery_outcome({"gpu-box": "offline"}, still_down, [offline()], RUN)
    assert kinds(again) == [] and again.changes == []
    up = discovery_outcome({"gpu-box": "offline"}, still_down, [online()], RUN)
    assert kinds(up) == ["DeviceOnline"]
    assert isinstance(up.events[0], DeviceOnline) and up.events[0].model_count == 2
    assert {(c.status, c.change) for c in up.changes} == {("active", "changed")}


def test_an_offline_device_keeps_its_models_and_a_forgotten_one_loses_them() -> None:
    models = {
        "gpu-box": stored(*parse_tags("gpu-box", TAGS)),
        "old": stored(*parse_tags("old", TAGS)),
    }
    outcome = discovery_outcome({"gpu-box": "online", "old": "online"}, models, [offline()], RUN)
    assert outcome.forgotten == ["old"]
    assert sorted((c.model.device, c.status) for c in outcome.changes) == [
        ("gpu-box", "unavailable"),
        ("gpu-box", "unavailable"),
        ("old", "removed"),
        ("old", "removed"),
    ]
    assert unavailable(stored(model("x"), status="removed")) == []
