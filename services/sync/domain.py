"""Pure decisions of sync: reading OpenRouter's catalog and Ollama's answers, choosing the
models to keep, and what a sync or a device check changes in the catalog. No I/O.

How OpenRouter's `/api/v1/models` is read (the rules the tests hold it to):

- Prices are strings in USD per token; they become `Decimal` USD per 1M tokens, never float.
- A model is priced per token when its output is text only (`architecture.output_modalities`,
  or the output side of the older `architecture.modality` "text+image->text"). Then
  `pricing.prompt` and `pricing.completion` are its prices, and `pricing.overrides` its higher
  tiers. Newer responses leave out price keys whose value is zero (`request`, `image`,
  `web_search`, ...); those are not read. The two that matter are present in every real
  response, including "0" for free models, so an entry that lacks one (or carries null, a
  non-number or a negative price) has an unknown price: it is skipped with a warning and never
  turned into a price of 0. An entry that says nothing of its output is skipped the same way.
- A model whose output is not text only (image, audio, video, embeddings, ...) is billed per
  image, per second, per request...: its "0" per-token prices do not make it free. Only the
  modalities in `OPENROUTER_OUTPUT_MODALITIES` are kept (text by default); a kept one has no
  per-token price (null, never 0) and carries every price of its listing in `unit_prices`, as
  listed (USD per unit). It passes the per-1M price cap only in the sense that the cap does
  not apply to it, and ranks last by price.
- `pricing.overrides` is a list of tiers, each with a condition (`min_prompt_tokens`, or a
  time window) and the price keys it replaces (missing keys inherit the base price). The
  tiers are kept (USD per 1M) and the price cap holds for the highest price of any tier.
- `"-1"` marks a router model (e.g. `openrouter/auto`) whose price is known only per request.
  Such an entry is a *variable-price* model: stored and published with `variable_price=true`
  and null prices, and left out by the price filter unless
  `OPENROUTER_INCLUDE_VARIABLE_PRICE=1` (the cap cannot be checked for it). If either of the
  two prices is "-1" the entry counts as variable.
- Nulls (`top_provider.max_completion_tokens`, even `context_length`) are fine; unknown fields
  are ignored and kept in the raw entry, stored as it came.
- A body that is not JSON, not an object with a `data` list, an empty `data`, or one in which
  no entry can be read fails the run; a failed run writes nothing to the catalog.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from contracts import Event, events
from contracts.events import (
    DeviceOffline,
    DeviceOnline,
    ModelSynced,
    highest_prices,
    within_price_cap,
)
from contracts.events import PriceTier as TierMessage

OPENROUTER = "openrouter"
OLLAMA = "ollama"
VARIABLE_PRICE = Decimal(-1)

Status = events.ModelStatus  # of a catalog entry
Change = events.ModelChange
RunStatus = Literal["running", "succeeded", "not_modified", "failed"]
DeviceStatus = Literal["online", "offline"]
RankKey = Literal["context_length", "cheapest", "newest"]


class CatalogFormatError(ValueError):
    """The response is not OpenRouter's catalog: the run fails and nothing is written."""


class EntryError(ValueError):
    """One catalog entry cannot be read; it is skipped, the others are kept."""


TEXT = "text"
PRICE_KEYS = ("prompt", "completion")


@dataclass(frozen=True)
class PriceTier:
    """Per-token prices that replace the base ones from `min_prompt_tokens` prompt tokens up
    (None: under another condition, such as a time window)."""

    min_prompt_tokens: int | None
    prompt_price_per_1m: Decimal
    completion_price_per_1m: Decimal


@dataclass(frozen=True)
class Model:
    """One model as the catalog holds it."""

    provider: str
    model_id: str
    name: str
    context_length: int | None
    # None for variable-price models and for models not priced per token; never 0 for them
    prompt_price_per_1m: Decimal | None
    completion_price_per_1m: Decimal | None
    variable_price: bool = False
    device: str | None = None  # the Ollama device serving it; None for hosted providers
    price_tiers: tuple[PriceTier, ...] = ()
    output_modalities: tuple[str, ...] = (TEXT,)
    # USD per unit as the source lists them; only for models not priced per token
    unit_prices: tuple[tuple[str, Decimal], ...] = ()
    created: int | None = field(default=None, compare=False)  # OpenRouter's unix time
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def tracked(self) -> tuple[object, ...]:
        """What consumers are told about when it changes."""
        return (self.name, self.context_length, self.output_modalities, *self.price)

    @property
    def price(self) -> tuple[object, ...]:
        return (
            self.prompt_price_per_1m,
            self.completion_price_per_1m,
            self.variable_price,
            self.price_tiers,
            self.unit_prices,
        )

    @property
    def priced_per_token(self) -> bool:
        return set(self.output_modalities) <= {TEXT}

    def highest_prices(self) -> tuple[Decimal, Decimal] | None:
        """(prompt, completion) USD per 1M at their highest over the base and every tier;
        None when the model has no per-token price (variable, or not priced per token)."""
        return highest_prices(
            self.prompt_price_per_1m,
            self.completion_price_per_1m,
            [(t.prompt_price_per_1m, t.completion_price_per_1m) for t in self.price_tiers],
        )


@dataclass(frozen=True)
class StoredModel:
    model: Model
    status: Status


@dataclass(frozen=True)
class Skipped:
    model_id: str  # "#<index>" when the entry has no usable id
    reason: str


@dataclass(frozen=True)
class ParsedCatalog:
    fetched: int  # entries in `data`, readable or not
    models: list[Model]
    skipped: list[Skipped]


# --- reading OpenRouter -------------------------------------------------------------------


# A per-token price above this is not a price but a mistake (or an attack): $1,000 per token
MAX_PRICE_PER_TOKEN = Decimal(1000)


def per_million(price_per_token: Decimal) -> Decimal:
    """USD per token → USD per 1M tokens, exactly. (How it is written is the serializer's
    business: `contracts.events.plain_decimal`.)"""
    return price_per_token.scaleb(6)


def _preview(body: bytes) -> str:
    text = body[:80].decode("utf-8", "replace").replace("\n", " ")
    return repr(text + ("…" if len(body) > 80 else ""))


def parse_catalog(body: bytes) -> ParsedCatalog:
    try:
        document = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise CatalogFormatError(
            f"the response is not JSON ({exc}); it starts with {_preview(body)}"
        ) from exc
    if not isinstance(document, dict) or "data" not in document:
        raise CatalogFormatError(f"the response has no `data`; it starts with {_preview(body)}")
    data = document["data"]
    if not isinstance(data, list):
        raise CatalogFormatError(f"`data` is a {type(data).__name__}, not a list")
    if not data:
        raise CatalogFormatError("`data` is empty; refusing to remove every model")
    models: list[Model] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for index, entry in enumerate(data):
        try:
            model = parse_entry(entry)
        except EntryError as exc:
            model_id = entry.get("id") if isinstance(entry, dict) else None
            label = model_id if isinstance(model_id, str) and model_id else f"#{index}"
            skipped.append(Skipped(label, str(exc)))
            continue
        if model.model_id in seen:
            skipped.append(Skipped(model.model_id, "duplicate id; the first entry is kept"))
            continue
        seen.add(model.model_id)
        models.append(model)
    if not models:
        first = skipped[0]
        raise CatalogFormatError(
            f"none of the {len(data)} entries could be read (first: {first.model_id}: "
            f"{first.reason})"
        )
    return ParsedCatalog(len(data), models, skipped)


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value < 0 or value != int(value):
        return None
    return int(value)


def _price(pricing: Mapping[str, Any], key: str, where: str = "") -> Decimal:
    if key not in pricing:
        raise EntryError(f"no {where}{key} price (a missing price is unknown, not 0)")
    value = pricing[key]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise EntryError(f"{where}{key} price {value!r} is not a number")
    try:
        price = Decimal(str(value).strip()[:100])
    except InvalidOperation:
        raise EntryError(f"{where}{key} price {value!r} is not a number") from None
    if not price.is_finite() or (price < 0 and price != VARIABLE_PRICE):
        raise EntryError(f"{where}{key} price {value!r} is not a price")
    if price > MAX_PRICE_PER_TOKEN:
        raise EntryError(f"{where}{key} price {value!r} is beyond any real price")
    return price


def output_modalities(entry: Mapping[str, Any]) -> tuple[str, ...]:
    """`architecture.output_modalities`, or the output side of `architecture.modality`
    ("text+image->text"); an entry that says neither has an unknown output."""
    architecture = entry.get("architecture")
    if isinstance(architecture, dict):
        listed = architecture.get("output_modalities")
        if isinstance(listed, list) and listed and all(isinstance(m, str) for m in listed):
            return tuple(sorted({m.strip().lower() for m in listed}))
        modality = architecture.get("modality")
        if isinstance(modality, str) and "->" in modality:
            outputs = {m.strip().lower() for m in modality.split("->", 1)[1].split("+")}
            if outputs - {""}:
                return tuple(sorted(outputs - {""}))
    raise EntryError("no output modalities (architecture.output_modalities)")


def _tiers(
    pricing: Mapping[str, Any], base: tuple[Decimal, Decimal]
) -> list[tuple[int | None, Decimal, Decimal]]:
    """`pricing.overrides` as (min_prompt_tokens, prompt, completion) USD per token: each tier
    replaces the price keys it lists; the others inherit the base price."""
    overrides = pricing.get("overrides")
    if overrides is None:
        return []
    if not isinstance(overrides, list):
        raise EntryError(f"pricing.overrides is a {type(overrides).__name__}, not a list")
    tiers = []
    for index, override in enumerate(overrides):
        where = f"pricing.overrides[{index}]."
        if not isinstance(override, dict):
            raise EntryError(f"{where[:-1]} is not an object")
        prompt, completion = (
            _price(override, key, where) if key in override else default
            for key, default in zip(PRICE_KEYS, base, strict=True)
        )
        threshold = override.get("min_prompt_tokens")
        if threshold is not None and _count(threshold) is None:
            raise EntryError(f"{where}min_prompt_tokens {threshold!r} is not a token count")
        tiers.append((_count(threshold), prompt, completion))
    return tiers


def _unit_prices(pricing: Mapping[str, Any]) -> tuple[tuple[str, Decimal], ...]:
    """Every price of a listing not priced per token, as listed (USD per unit)."""
    prices = {}
    for key, value in pricing.items():
        if key == "overrides" or value is None or isinstance(value, dict | list):
            continue  # not a unit price; the raw entry keeps it
        prices[key] = _price(pricing, key)
    if not prices:
        raise EntryError("no price at all (a missing price is unknown, not 0)")
    return tuple(sorted(prices.items()))


def parse_entry(entry: Any) -> Model:
    if not isinstance(entry, dict):
        raise EntryError(f"an entry is a {type(entry).__name__}, not an object")
    model_id = entry.get("id")
    if not isinstance(model_id, str) or not model_id.strip():
        raise EntryError("no id")
    name = entry.get("name")
    context_length = _count(entry.get("context_length"))
    if context_length is None and isinstance(entry.get("top_provider"), dict):
        context_length = _count(entry["top_provider"].get("context_length"))
    pricing = entry.get("pricing")
    if not isinstance(pricing, dict):
        raise EntryError("no pricing")
    outputs = output_modalities(entry)
    common: dict[str, Any] = dict(
        provider=OPENROUTER,
        model_id=model_id,
        name=name if isinstance(name, str) and name else model_id,
        context_length=context_length,
        output_modalities=outputs,
        created=_count(entry.get("created")),
        raw=entry,
    )
    if not set(outputs) <= {TEXT}:  # billed per image, second, request...: no per-token price
        units = _unit_prices(pricing)
        variable = VARIABLE_PRICE in dict(units).values()
        return Model(
            prompt_price_per_1m=None,
            completion_price_per_1m=None,
            variable_price=variable,
            unit_prices=() if variable else units,
            **common,
        )
    prompt, completion = (_price(pricing, key) for key in PRICE_KEYS)
    tiers = _tiers(pricing, (prompt, completion))
    if VARIABLE_PRICE in (prompt, completion, *(p for _, *tier in tiers for p in tier)):
        return Model(
            prompt_price_per_1m=None, completion_price_per_1m=None, variable_price=True, **common
        )
    return Model(
        prompt_price_per_1m=per_million(prompt),
        completion_price_per_1m=per_million(completion),
        price_tiers=tuple(
            PriceTier(threshold, per_million(p), per_million(c)) for threshold, p, c in tiers
        ),
        **common,
    )


# --- choosing what to keep ----------------------------------------------------------------


@dataclass(frozen=True)
class SelectionRules:
    max_price_per_1m: Decimal
    top_n: int
    rank_by: RankKey = "context_length"
    include_variable_price: bool = False
    output_modalities: frozenset[str] = frozenset({TEXT})

    @property
    def key(self) -> str:
        """Stored with a run: a 304 may only be trusted when the rules have not changed since."""
        key = (
            f"max_price_per_1m={self.max_price_per_1m.normalize()};top_n={self.top_n};"
            f"rank_by={self.rank_by};include_variable_price={self.include_variable_price}"
        )
        if self.output_modalities != {TEXT}:  # so that keys stored before it stay valid
            key += f";output_modalities={','.join(sorted(self.output_modalities))}"
        return key


def within_price(model: Model, rules: SelectionRules) -> bool:
    """The price rule: a variable price only when allowed; a model not priced per token (its
    output is not text) is outside what a per-1M cap can measure, so the cap does not hold
    it back (keeping its modality is the operator's choice); any other model has its prompt
    and completion prices at most the cap in every tier."""
    if model.variable_price:
        return rules.include_variable_price
    highest = model.highest_prices()
    if highest is None:
        return not model.priced_per_token
    return within_price_cap(highest, rules.max_price_per_1m)


def _total_price(model: Model) -> Decimal:
    """Prompt + completion at their highest tier; unknown (variable, or not priced per token)
    ranks as the most expensive, so nothing is ever first for looking free."""
    highest = model.highest_prices()
    return Decimal("Infinity") if highest is None else sum(highest, Decimal(0))


RANK_KEYS: dict[RankKey, Callable[[Model], tuple[Any, ...]]] = {
    "context_length": lambda m: (-(m.context_length or 0), _total_price(m), m.model_id),
    "cheapest": lambda m: (_total_price(m), -(m.context_length or 0), m.model_id),
    "newest": lambda m: (-(m.created or 0), m.model_id),
}


def kept_output(model: Model, rules: SelectionRules) -> bool:
    return set(model.output_modalities) <= rules.output_modalities


def select(models: Iterable[Model], rules: SelectionRules) -> tuple[list[Model], list[Model]]:
    """(the models of a kept output modality within the price cap, the top N of them by the
    rank key)."""
    filtered = [m for m in models if kept_output(m, rules) and within_price(m, rules)]
    return filtered, sorted(filtered, key=RANK_KEYS[rules.rank_by])[: rules.top_n]


# --- what changes -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelChange:
    """A catalog row to write. `change` None: only the stored raw entry differs (a new
    description, say); the row is refreshed and nobody is told."""

    model: Model
    status: Status
    change: Change | None
    price_changed: bool = False


def diff(current: Mapping[str, StoredModel], seen: Iterable[Model]) -> list[ModelChange]:
    """What one source's latest list changes, against its stored rows (keyed by model id).

    Seen and new, or seen again after removal: added. Seen, and its name, context length or
    price differ, or it was unavailable: changed. Stored, not removed, and not seen: removed.
    Anything else writes nothing, so an unchanged list costs no row and no event."""
    changes: list[ModelChange] = []
    seen_ids: set[str] = set()
    for model in seen:
        seen_ids.add(model.model_id)
        old = current.get(model.model_id)
        if old is None:
            changes.append(ModelChange(model, "active", "added", price_changed=True))
            continue
        price_changed = old.model.price != model.price
        if old.status == "removed":
            changes.append(ModelChange(model, "active", "added", price_changed))
        elif old.status != "active" or old.model.tracked != model.tracked:
            changes.append(ModelChange(model, "active", "changed", price_changed))
        elif old.model.raw != model.raw:
            changes.append(ModelChange(model, "active", None))
    for model_id, old in current.items():
        if model_id not in seen_ids and old.status != "removed":
            changes.append(ModelChange(old.model, "removed", "removed"))
    return changes


def unavailable(current: Mapping[str, StoredModel]) -> list[ModelChange]:
    """The models of a device that does not answer: kept, but reported unavailable."""
    return [
        ModelChange(old.model, "unavailable", "changed")
        for old in current.values()
        if old.status == "active"
    ]


def change_counts(changes: Iterable[ModelChange]) -> dict[Change, int]:
    counts: dict[Change, int] = {"added": 0, "changed": 0, "removed": 0}
    for c in changes:
        if c.change:
            counts[c.change] += 1
    return counts


def tier_message(tier: PriceTier) -> TierMessage:
    return TierMessage(
        min_prompt_tokens=tier.min_prompt_tokens,
        prompt_price_per_1m=tier.prompt_price_per_1m,
        completion_price_per_1m=tier.completion_price_per_1m,
    )


def model_synced(changes: Iterable[ModelChange], batch_id: uuid.UUID) -> list[ModelSynced]:
    """One `model.synced` per told change; ids derive from the run, so a retried write of the
    same run cannot publish twice."""
    return [
        ModelSynced(
            event_id=uuid.uuid5(batch_id, f"{m.provider}/{m.device or ''}/{m.model_id}"),
            provider=m.provider,
            model_id=m.model_id,
            device=m.device,
            name=m.name,
            change=c.change,
            status=c.status,
            context_length=m.context_length,
            prompt_price_per_1m=m.prompt_price_per_1m,
            completion_price_per_1m=m.completion_price_per_1m,
            variable_price=m.variable_price,
            price_tiers=[tier_message(t) for t in m.price_tiers],
            output_modalities=list(m.output_modalities),
            unit_prices=dict(m.unit_prices),
        )
        for c in changes
        if c.change
        for m in (c.model,)
    ]


# --- local Ollama devices -----------------------------------------------------------------


def parse_version(body: Any) -> str:
    if not isinstance(body, dict) or not isinstance(body.get("version"), str):
        raise ValueError("/api/version has no `version`")
    version: str = body["version"]
    return version


def parse_tags(device: str, body: Any) -> list[Model]:
    """Ollama's `/api/tags`: {"models": [{"name", "model", "modified_at", "size", "digest",
    "details": {...}}]}. Local models cost nothing; their context length is not in the list."""
    if not isinstance(body, dict) or not isinstance(body.get("models"), list):
        raise ValueError("/api/tags has no `models` list")
    models: dict[str, Model] = {}
    for entry in body["models"]:
        if not isinstance(entry, dict):
            continue
        model_id = entry.get("model") or entry.get("name")
        if not isinstance(model_id, str) or model_id in models:
            continue
        name = entry.get("name")
        models[model_id] = Model(
            provider=OLLAMA,
            model_id=model_id,
            name=name if isinstance(name, str) and name else model_id,
            context_length=None,
            prompt_price_per_1m=Decimal(0),
            completion_price_per_1m=Decimal(0),
            device=device,
            raw=entry,
        )
    return list(models.values())


@dataclass(frozen=True)
class DeviceCheck:
    """What one device answered, or why it did not."""

    device: str
    base_url: str
    version: str | None = None
    models: list[Model] = field(default_factory=list)
    error: str | None = None  # set: the device is offline

    @property
    def status(self) -> DeviceStatus:
        return "offline" if self.error else "online"


@dataclass(frozen=True)
class DiscoveryOutcome:
    checks: list[DeviceCheck]
    transitions: list[DeviceCheck]  # devices whose status differs from the stored one
    forgotten: list[str]  # devices no longer configured; their models are removed
    changes: list[ModelChange]
    events: list[Event]


def discovery_outcome(
    device_status: Mapping[str, str],
    models: Mapping[str, Mapping[str, StoredModel]],
    checks: Sequence[DeviceCheck],
    batch_id: uuid.UUID,
) -> DiscoveryOutcome:
    """A discovery pass: each device's models against its answer; `device.offline` and
    `device.online` only where the status differs from the stored one (a device seen for the
    first time reports its status too, since nobody knows it yet)."""
    changes: list[ModelChange] = []
    transitions: list[DeviceCheck] = []
    events: list[Event] = []
    for check in checks:
        stored = models.get(check.device, {})
        changes += diff(stored, check.models) if check.status == "online" else unavailable(stored)
        if device_status.get(check.device) == check.status:
            continue
        transitions.append(check)
        event_id = uuid.uuid5(batch_id, f"device/{check.device}")
        if check.error:
            events.append(
                DeviceOffline(
                    event_id=event_id,
                    device=check.device,
                    base_url=check.base_url,
                    reason=check.error,
                )
            )
        else:
            events.append(
                DeviceOnline(
                    event_id=event_id,
                    device=check.device,
                    base_url=check.base_url,
                    version=check.version,
                    model_count=len(check.models),
                )
            )
    checked = {c.device for c in checks}
    forgotten = sorted((set(device_status) | set(models)) - checked)
    for device in forgotten:
        changes += diff(models.get(device, {}), [])
    return DiscoveryOutcome(
        checks=list(checks),
        transitions=transitions,
        forgotten=forgotten,
        changes=changes,
        events=[*events, *model_synced(changes, batch_id)],
    )
