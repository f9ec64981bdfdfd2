"""The event catalog (and the AsyncAPI document exported from it) lists as consumers exactly
the durable consumers the fleet's services run: built from each service's own spec."""

from __future__ import annotations

import importlib

from contracts.catalog import CHANNELS, FLEET_SERVICES, durable_name
from services.runtime.service import ServiceSpec

Consumption = tuple[str, str, str]  # service, subject, durable consumer


def specs() -> list[ServiceSpec]:
    return [importlib.import_module(f"services.{n}.app").build() for n in FLEET_SERVICES]


def running() -> set[Consumption]:
    return {(s.name, c.event.subject, c.name) for s in specs() for c in s.consumers}


def promised() -> set[Consumption]:
    return {
        (service, c.subject, durable_name(service, c.subject))
        for c in CHANNELS
        if c.stream is not None  # core NATS (heartbeats): a subscription, no durable
        for service in c.consumers
        if service in FLEET_SERVICES
    }


def test_every_consumer_the_catalog_lists_is_one_a_service_runs() -> None:
    assert sorted(promised() - running()) == []


def test_every_consumer_a_service_runs_is_in_the_catalog_under_its_durable_name() -> None:
    assert sorted(running() - promised()) == []


def test_the_fleet_services_are_the_ones_that_exist() -> None:
    assert [s.name for s in specs()] == list(FLEET_SERVICES)
