"""Which destinations get a film's report: [[routes]] in file order, the first that matches wins;
a film no route matches takes route "default": [routing] default, or every destination when
[routing] has no default.

A route matches when each of its keys that is set matches one of its values (keys left out
match anything): calling_ae_title exactly, source_address by IP network, modality and
station_name without regard to case. What a film is matched on is recorded with its job at
receive time (pacs_ai.receive.scp); the route is chosen when its report is queued (pacs_ai.classify.worker), so a
config change between the two applies to films not yet reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from pacs_ai.config import DEFAULT_ROUTE, Config, Route
from pacs_ai.network.addresses import address_in, parse_networks


@dataclass(frozen=True)
class RouteFacts:
    """What routes match on, as the listener recorded it."""

    calling_ae_title: str | None
    source_address: str | None
    modality: str | None
    station_name: str | None


@dataclass(frozen=True)
class RouteChoice:
    name: str  # the [[routes]] name, or "default"
    destinations: tuple[str, ...]


def _address_matches(address: str | None, networks: tuple[str, ...]) -> bool:
    return bool(address) and address_in(address, parse_networks(networks))


def _same(value: str | None, choices: tuple[str, ...]) -> bool:
    return value is not None and value.strip().casefold() in {c.casefold() for c in choices}


def route_matches(route: Route, facts: RouteFacts) -> bool:
    if route.calling_ae_title and (facts.calling_ae_title or "").strip() \
            not in route.calling_ae_title:
        return False
    if route.source_address and not _address_matches(facts.source_address,
                                                     route.source_address):
        return False
    if route.modality and not _same(facts.modality, route.modality):
        return False
    if route.station_name and not _same(facts.station_name, route.station_name):
        return False
    return True


def choose_route(config: Config, facts: RouteFacts) -> RouteChoice:
    for route in config.routing.routes:
        if route_matches(route, facts):
            return RouteChoice(route.name, route.destinations)
    default = config.routing.default
    if default is None:
        default = tuple(d.name for d in config.destinations)
    return RouteChoice(DEFAULT_ROUTE, default)
