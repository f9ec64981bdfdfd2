"""The pure rules of sync: reading OpenRouter's catalog, the price filter and ranking, what a
sync changes, and device transitions."""

from __future__ import annotations

import json
import random
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from contracts.events import DeviceOffline, DeviceOnline, ModelSynced, plain_decimal
from services.sync.domain import (
    CatalogFormatError,
    DeviceCheck,
    Model,
    PriceTier,
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

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "openrouter"
OPENROUTER_DATA = SHARED_DATA / "openrouter"
needs_data = pytest.mark.skipif(
    not OPENROUTER_DATA.is_dir(),
    reason=f"an extra over the fixtures: real OpenRouter responses are not in {OPENROUTER_DATA}",
)
RUN = uuid.UUID("00000000-0000-0000-0000-0000000000aa")
CAP = Decimal(1_000_000)


def entry(
    model_id: str, prompt: Any = "0.000001", completion: Any = "0.000002", **extra: Any
) -> dict[str, Any]:
    e: dict[str, Any] = {
        "id": model_id,
        "name": extra.pop("name", model_id.title()),
        "created": extra.pop("created", 1750000000),
        "context_length": extra.pop("context_length", 128000),
        "architecture": {"modality": "text->text", "output_modalities": ["text"]},
        "pricing": {"prompt": prompt, "completion": completion},
        "top_provider": {"context_length": None, "max_completion_tokens": None},
    }
    e.update(extra)
    return e


def producing(model_id: str, outputs: list[str], **pricing: str) -> dict[str, Any]:
    """An entry whose output is `outputs`, priced as given."""
    return entry(
        model_id,
        architecture={"modality": "text->" + "+".join(outputs), "output_modalities": outputs},
        pricing=pricing,
    )


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


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
    assert a.prompt_price_per_1m == Decimal("2.5") and plain_decimal(a.prompt_price_per_1m) == "2.5"
    assert plain_decimal(a.completion_price_per_1m) == "0.035"  # type: ignore[arg-type]
    assert isinstance(a.prompt_price_per_1m, Decimal)
    assert (free.prompt_price_per_1m, free.completion_price_per_1m) == (Decimal(0), Decimal(0))
    [x] = parse_catalog(body(entry("x", "0.00001", "0.00015"))).models
    assert x.completion_price_per_1m == 150


@pytest.mark.parametrize(
    ("per_token", "per_million"),
    [
        ("0.36", "360000"),  # str(Decimal) would say 3.6E+5
        ("0.0000000000001", "0.0000001"),  # and 1E-7
        ("0.00015", "150"),
        ("0.000000035", "0.035"),
        ("0.0000025000", "2.5"),
        ("0", "0"),
        ("0.00000008333333333333334", "0.08333333333333334"),
    ],
)
def test_prices_travel_as_plain_decimal_strings(per_token: str, per_million: str) -> None:
    [m] = parse_catalog(body(entry("a/b", per_token, per_token))).models
    [event] = model_synced(diff({}, [m]), RUN)
    sent = json.loads(event.model_dump_json())
    assert sent["prompt_price_per_1m"] == sent["completion_price_per_1m"] == per_million
    assert ModelSynced.model_validate_json(event.model_dump_json()) == event  # exact round trip


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
        ({"prompt": "Infinity", "completion": "0"}, "not a price"),
        ({"prompt": "1e999999", "completion": "0"}, "beyond any real price"),
        ({"prompt": "1" * 5000, "completion": "0"}, "beyond any real price"),
        ({"prompt": "0", "completion": "0", "overrides": {"a": 1}}, "not a list"),
        ({"prompt": "0", "completion": "0", "overrides": [{"prompt": "x"}]}, "overrides[0]"),
        (
            {"prompt": "0", "completion": "0", "overrides": [{"min_prompt_tokens": -5}]},
            "not a token count",
        ),
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


def test_an_entry_that_does_not_say_what_it_outputs_is_skipped() -> None:
    silent = entry("x/silent")
    del silent["architecture"]
    empty = entry("x/empty", architecture={"output_modalities": []})
    older = entry("x/older", architecture={"modality": "text+image->text"})  # no list yet
    parsed = parse_catalog(body(silent, empty, older))
    assert [m.model_id for m in parsed.models] == ["x/older"]
    assert parsed.models[0].output_modalities == ("text",)
    assert {s.model_id: s.reason for s in parsed.skipped} == {
        "x/silent": "no output modalities (architecture.output_modalities)",
        "x/empty": "no output modalities (architecture.output_modalities)",
    }


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


RESPONSES = [
    pytest.param(lambda: fixture("catalog-a.json"), id="fixture-a"),
    pytest.param(lambda: fixture("catalog-b.json"), id="fixture-b"),
    *(
        pytest.param(
            lambda day=day: (OPENROUTER_DATA / f"{day}.json").read_bytes(), id=day, marks=needs_data
        )
        for day in ("2025-07-29", "2026-03-13", "2026-04-02")
    ),
]


@pytest.mark.parametrize("response", RESPONSES)
def test_every_response_is_read_whole(response: Any) -> None:
    raw = response()
    entries = json.loads(raw)["data"]
    parsed = parse_catalog(raw)
    assert parsed.skipped == []
    assert parsed.fetched == len(parsed.models) == len(entries)
    for m, e in zip(parsed.models, entries, strict=True):
        outputs = e["architecture"]["output_modalities"]
        pricing = e["pricing"]
        assert m.output_modalities == tuple(sorted(outputs))
        assert m.variable_price == ("-1" in (pricing["prompt"], pricing["completion"]))
        if outputs != ["text"]:  # never priced per token, never 0
            assert m.prompt_price_per_1m is None and m.completion_price_per_1m is None
            if not m.variable_price:
                assert dict(m.unit_prices) == {k: Decimal(v) for k, v in pricing.items()}
        elif not m.variable_price:
            assert m.prompt_price_per_1m == Decimal(pricing["prompt"]) * 1_000_000
            assert m.completion_price_per_1m == Decimal(pricing["completion"]) * 1_000_000
            assert len(m.price_tiers) == len(pricing.get("overrides", []))
            assert m.unit_prices == ()


def test_the_fixture_holds_the_shapes_it_is_for() -> None:
    a = parse_catalog(fixture("catalog-a.json")).models
    assert {m.model_id for m in a if m.variable_price} == {
        "openrouter/auto",
        "openrouter/bodybuilder",
    }
    assert {m for model in a for m in model.output_modalities} >= {
        "text", "image", "video", "embeddings", "rerank", "speech", "transcription", "audio"
    }  # fmt: skip
    assert sum(1 for m in a if m.price_tiers) == 3
    assert any(m.raw["top_provider"]["max_completion_tokens"] is None for m in a)
    assert any(set(m.raw["pricing"]) == {"prompt", "completion"} for m in a)


# --- what a model outputs -----------------------------------------------------------------

NOT_TEXT = [
    producing("img/gen", ["image"], prompt="0", completion="0", image="0.04"),
    producing("img/chat", ["image", "text"], prompt="0.0000003", completion="0.0000025"),
    producing("vid/gen", ["video"], prompt="0", completion="0", request="0.5"),
    producing("emb/large", ["embeddings"], prompt="0.00000002", completion="0"),
    producing("tts/hd", ["speech"], prompt="0.000015", completion="0"),
    producing("stt/one", ["transcription"], prompt="0", completion="0", audio="0.0001"),
    producing("rr/two", ["rerank"], prompt="0", completion="0", request="0.002"),
    producing("music/clip", ["text", "audio"], prompt="0", completion="0"),
]
TEXT_MODELS = [entry("txt/free:free", "0", "0"), entry("txt/cheap"), entry("txt/dear", "1", "1")]


def test_only_text_output_is_kept_by_default() -> None:
    models = parse_catalog(body(*NOT_TEXT, *TEXT_MODELS)).models
    filtered, selected = select(models, SelectionRules(CAP, 100, "cheapest"))
    assert [m.model_id for m in filtered] == ["txt/free:free", "txt/cheap", "txt/dear"]
    assert [m.model_id for m in selected] == ["txt/free:free", "txt/cheap", "txt/dear"]


def test_output_that_is_not_text_is_never_free_nor_first_by_price() -> None:
    models = parse_catalog(body(*NOT_TEXT, *TEXT_MODELS)).models
    every_output = frozenset(
        {"text", "image", "video", "embeddings", "speech", "transcription", "rerank", "audio"}
    )
    rules = SelectionRules(Decimal(0), 5, "cheapest", output_modalities=every_output)
    filtered, selected = select(models, rules)
    # a $0 cap keeps the free text model and every model not priced per token (the cap
    # measures per-token prices only), but ranks none of those as free
    assert selected[0].model_id == "txt/free:free"
    assert {m.model_id for m in filtered} == {"txt/free:free"} | {e["id"] for e in NOT_TEXT}
    for m in filtered:
        if m.model_id == "txt/free:free":
            continue
        assert m.prompt_price_per_1m is None and m.completion_price_per_1m is None
        assert m.unit_prices and not m.variable_price
    by_id = {m.model_id: m for m in models}
    assert dict(by_id["img/gen"].unit_prices) == {
        "prompt": 0,
        "completion": 0,
        "image": Decimal("0.04"),
    }
    [event] = model_synced(diff({}, [by_id["img/gen"]]), RUN)
    sent = json.loads(event.model_dump_json())
    assert (sent["prompt_price_per_1m"], sent["completion_price_per_1m"]) == (None, None)
    assert sent["unit_prices"] == {"completion": "0", "image": "0.04", "prompt": "0"}
    assert sent["output_modalities"] == ["image"]
    # ranked by price, a model without a per-token price comes after every priced one
    ranked = select(models, SelectionRules(CAP, 100, "cheapest", output_modalities=every_output))
    priced = [m.model_id for m in ranked[1] if m.prompt_price_per_1m is not None]
    assert [m.model_id for m in ranked[1]][: len(priced)] == priced


def test_keeping_a_modality_is_all_or_nothing_per_model() -> None:
    models = parse_catalog(body(*NOT_TEXT, *TEXT_MODELS)).models
    with_images = SelectionRules(CAP, 100, output_modalities=frozenset({"text", "image"}))
    kept = {m.model_id for m in select(models, with_images)[0]}
    assert kept == {"img/gen", "img/chat", "txt/free:free", "txt/cheap", "txt/dear"}


# --- price tiers (pricing.overrides) --------------------------------------------------------


def tiered(model_id: str, prompt: str, completion: str, *overrides: dict[str, Any]) -> Any:
    e = entry(model_id, prompt, completion)
    e["pricing"]["overrides"] = list(overrides)
    return e


def test_tiers_inherit_the_prices_they_do_not_list() -> None:
    [m] = parse_catalog(
        body(
            tiered(
                "g/pro",
                "0.00000125",
                "0.00001",
                {"min_prompt_tokens": 200000, "prompt": "0.0000025", "input_cache_read": "1"},
                {"utc_start": "16:30", "utc_end": "00:30", "completion": "0.000005"},
            )
        )
    ).models
    assert m.price_tiers == (
        PriceTier(200000, Decimal("2.5"), Decimal(10)),
        PriceTier(None, Decimal("1.25"), Decimal(5)),
    )
    assert m.highest_prices() == (Decimal("2.5"), Decimal(10))
    [event] = model_synced(diff({}, [m]), RUN)
    assert [
        (t["min_prompt_tokens"], t["prompt_price_per_1m"], t["completion_price_per_1m"])
        for t in json.loads(event.model_dump_json())["price_tiers"]
    ] == [(200000, "2.5", "10"), (None, "1.25", "5")]


def test_the_price_cap_holds_for_the_highest_tier() -> None:
    base = ("0.000001", "0.000002")  # 1 and 2 USD per 1M
    models = parse_catalog(
        body(
            tiered("under", *base, {"min_prompt_tokens": 1000, "prompt": "0.000003"}),
            tiered("prompt-tier-over", *base, {"min_prompt_tokens": 1000, "prompt": "0.0000031"}),
            tiered(
                "completion-over", *base, {"min_prompt_tokens": 1000, "completion": "0.0000031"}
            ),
            tiered(
                "second-tier-over",
                *base,
                {"min_prompt_tokens": 1000, "prompt": "0.000002"},
                {"min_prompt_tokens": 9000, "prompt": "0.000004"},
            ),
            tiered("variable-tier", *base, {"min_prompt_tokens": 10, "prompt": "-1"}),
        )
    ).models
    filtered, _ = select(models, SelectionRules(Decimal(3), 10))
    assert [m.model_id for m in filtered] == ["under"]
    assert {m.model_id for m in models if m.variable_price} == {"variable-tier"}
    # ranked by price, the highest tier is what counts: 1 + 3.1, 3 + 2, 3.1 + 2, 4 + 2
    cheapest = select(models, SelectionRules(Decimal(10), 10, "cheapest"))[1]
    assert [m.model_id for m in cheapest] == [
        "completion-over",
        "under",
        "prompt-tier-over",
        "second-tier-over",
    ]


def test_a_new_tier_is_a_price_change() -> None:
    plain = parse_catalog(body(entry("a", "0.000001", "0.000002"))).models
    tiered_a = parse_catalog(
        body(tiered("a", "0.000001", "0.000002", {"min_prompt_tokens": 5, "prompt": "0.00001"}))
    ).models
    [change] = diff(stored(*plain), tiered_a)
    assert (change.change, change.price_changed) == ("changed", True)


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
    assert ranked("cheapest", top_n=2) == ["cheap", "a"]
    # the order the source lists them in does not matter
    shuffled = models[:]
    random.Random(7).shuffle(shuffled)
    for rank_by in ("context_length", "cheapest", "newest"):
        rules = SelectionRules(cap, 3, rank_by)
        assert select(shuffled, rules)[1] == select(models, rules)[1]


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
                SelectionRules(
                    Decimal(100), 100, output_modalities=frozenset({"text", "image"})
                ).key,
            }
        )
        == 6
    )
    # a key stored before output modalities were a rule still matches the default rules
    assert "output_modalities" not in base.key


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
