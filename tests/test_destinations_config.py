"""[[destinations]] kind = "dicomweb" and [[routes]]: what is read, and errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_ai.config import ConfigError, DicomWebTarget, parse_config


def parse(tmp_path: Path, data: dict):
    return parse_config(data, base_dir=tmp_path)


def secret(tmp_path: Path, name: str = "password") -> str:
    path = tmp_path / name
    path.write_text("s3cret\n")
    return name  # relative: resolved against the config's folder


def test_a_dicomweb_destination_is_read(tmp_path):
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    config = parse(tmp_path, {"destinations": [
        {"name": "web", "kind": "dicomweb", "url": "https://pacs.example.org/dicom-web/",
         "auth": "basic", "username": "ai", "password_file": secret(tmp_path),
         "ca_file": "ca.pem", "timeout_seconds": 5},
        {"kind": "dicomweb", "url": "http://10.0.0.9:8042/dicom-web", "auth": "bearer",
         "token_file": secret(tmp_path, "token")},
        {"ae_title": "PACS", "host": "pacs", "port": 104}]})
    web, second, dimse = config.destinations
    assert web.kind == "dicomweb" and web.name == "web" and web.timeout_seconds == 5
    assert web.dicomweb == DicomWebTarget(
        url="https://pacs.example.org/dicom-web", auth="basic", username="ai",
        password_file=tmp_path / "password", ca_file=tmp_path / "ca.pem")
    assert second.name == "http://10.0.0.9:8042/dicom-web"  # the default name is the url
    assert second.dicomweb.auth == "bearer" and second.dicomweb.token_file == tmp_path / "token"
    assert dimse.kind == "dimse" and dimse.dicomweb is None


@pytest.mark.parametrize("entry,message", [
    ({"kind": "stow"}, "[[destinations]] #1 kind: 'stow' is not one of 'dimse', 'dicomweb'"),
    ({"kind": "dicomweb"}, "[[destinations]] #1 url: is required for kind = \"dicomweb\""),
    ({"kind": "dicomweb", "url": "ftp://x/y"}, "[[destinations]] #1 url: expected an http://"),
    ({"kind": "dicomweb", "url": "http://x/dw", "auth": "basic", "username": "u"},
     '[[destinations]] #1 password_file: is required with auth = "basic"'),
    ({"kind": "dicomweb", "url": "http://x/dw", "auth": "bearer"},
     '[[destinations]] #1 token_file: is required with auth = "bearer"'),
    ({"kind": "dicomweb", "url": "http://x/dw", "username": "u"},
     '[[destinations]] #1 username: is not used with auth = "none"'),
    ({"kind": "dicomweb", "url": "http://x/dw", "auth": "bearer", "token_file": "missing"},
     "[[destinations]] #1 token_file: file not found"),
    ({"kind": "dicomweb", "url": "http://x/dw", "ae_title": "PACS"},
     "[[destinations]] #1 ae_title: is for C-STORE destinations"),
    ({"kind": "dicomweb", "url": "http://x/dw", "ca_file": "password"},
     "[[destinations]] #1 ca_file: is only used with an https:// url"),
    ({"kind": "dicomweb", "url": "http://x/dw", "verify": False},
     "[[destinations]] #1: unknown key 'verify'"),
])
def test_dicomweb_mistakes_name_the_key(tmp_path, entry, message):
    secret(tmp_path)
    with pytest.raises(ConfigError) as error:
        parse(tmp_path, {"destinations": [entry]})
    assert str(error.value).startswith(message), str(error.value)


# --- [[routes]] and [routing] -----------------------------------------------------------------

from pacs_ai.config import Route  # noqa: E402
from pacs_ai.deliver.routing import RouteChoice, RouteFacts, choose_route  # noqa: E402

TWO_DESTINATIONS = [{"name": "main", "ae_title": "PACS", "host": "pacs", "port": 104},
                    {"name": "er-archive", "kind": "dicomweb", "url": "http://er/dicom-web"}]


def routed(tmp_path, routes, routing=None):
    data = {"destinations": TWO_DESTINATIONS, "routes": routes}
    if routing is not None:
        data["routing"] = routing
    return parse(tmp_path, data)


def facts(ae="CR1", address="10.1.2.3", modality="CR", station="ROOM1") -> RouteFacts:
    return RouteFacts(ae, address, modality, station)


def test_routes_are_read_in_order(tmp_path):
    config = routed(tmp_path, [
        {"name": "er", "calling_ae_title": ["ER_CR", "ER_DX"], "destinations": ["er-archive"]},
        {"source_address": "10.9.0.0/16", "modality": "dx", "station_name": "Ward 3",
         "destinations": ["main", "er-archive", "main"]}],
        {"default": ["main"]})
    er, second = config.routing.routes
    assert er == Route(name="er", destinations=("er-archive",),
                       calling_ae_title=("ER_CR", "ER_DX"))
    assert second == Route(name="route-2", destinations=("main", "er-archive"),
                           source_address=("10.9.0.0/16",), modality=("DX",),
                           station_name=("Ward 3",))
    assert config.routing.default == ("main",)
    assert parse(tmp_path, {"destinations": TWO_DESTINATIONS}).routing.default is None


def test_the_first_matching_route_wins_and_the_rest_go_to_the_default(tmp_path):
    config = routed(tmp_path, [
        {"name": "er", "calling_ae_title": "ER_CR", "destinations": ["er-archive"]},
        {"name": "ward-dx", "source_address": ["10.9.0.0/16", "fd00::/8"], "modality": "DX",
         "station_name": "ward 3", "destinations": []},
        {"name": "all-er", "calling_ae_title": "ER_CR", "destinations": ["main"]}],
        {"default": ["main"]})
    assert choose_route(config, facts(ae="ER_CR")) == RouteChoice("er", ("er-archive",))
    # every key of a route must match; modality and station name without case
    assert choose_route(config, facts(address="10.9.1.1", modality="dx", station="WARD 3")) \
        == RouteChoice("ward-dx", ())
    assert choose_route(config, facts(address="::ffff:10.9.1.1", modality="DX",
                                      station="Ward 3")).name == "ward-dx"
    assert choose_route(config, facts(address="10.8.1.1", modality="DX",
                                      station="Ward 3")) == RouteChoice("default", ("main",))
    assert choose_route(config, facts(address="10.9.1.1", modality="CR",
                                      station="Ward 3")).name == "default"
    assert choose_route(config, facts(address=None, modality=None, station=None)).name \
        == "default"
    # without [routing] default, films no route matches go to every destination
    without_default = routed(tmp_path, [{"calling_ae_title": "ER_CR", "destinations": ["main"]}])
    assert choose_route(without_default, facts()) == \
        RouteChoice("default", ("main", "er-archive"))


@pytest.mark.parametrize("routes,routing,message", [
    ([{"calling_ae_title": "ER", "destinations": ["nowhere"]}], None,
     "[[routes]] #1 destinations: 'nowhere' is not the name of a [[destinations]] block"),
    ([{"calling_ae_title": "ER"}], None, "[[routes]] #1 destinations: is required"),
    ([{"destinations": ["main"]}], None, "[[routes]] #1 (route-1): give at least one of"),
    ([{"source_address": "10.1.2.300", "destinations": ["main"]}], None,
     "[[routes]] #1 source_address: '10.1.2.300': not an IP address or network"),
    ([{"calling_ae_title": "WAY_TOO_LONG_AE_TITLE", "destinations": ["main"]}], None,
     "[[routes]] #1 calling_ae_title: 'WAY_TOO_LONG_AE_TITLE'"),
    ([{"modality": 3, "destinations": ["main"]}], None, "[[routes]] #1 modality: expected"),
    ([{"modality": "CR", "destinations": ["main"], "aet": "X"}], None,
     "[[routes]] #1: unknown key 'aet'"),
    ([{"name": "default", "modality": "CR", "destinations": ["main"]}], None,
     "[[routes]] #1 name: 'default' is the name of films that match no route"),
    ([{"name": "a", "modality": "CR", "destinations": []},
      {"name": "a", "modality": "DX", "destinations": []}], None,
     "[[routes]]: two routes are named 'a'"),
    ([], {"default": ["main", "gone"]},
     "[routing] default: 'gone' is not the name of a [[destinations]] block"),
    ([], {"fallback": ["main"]}, "[routing]: unknown key 'fallback'"),
    ({"modality": "CR"}, None, "routes must be written as [[routes]] blocks"),
])
def test_routing_mistakes_name_the_key(tmp_path, routes, routing, message):
    with pytest.raises(ConfigError) as error:
        routed(tmp_path, routes, routing)
    assert str(error.value).startswith(message), str(error.value)


def test_serve_stops_at_start_up_on_a_route_to_an_unknown_destination(tmp_path):
    from testbed.dicom_peers import pacs_ai_cli

    config = tmp_path / "pacs-ai.toml"
    config.write_text('[[destinations]]\nname = "main"\nae_title = "PACS"\nhost = "pacs"\n'
                      'port = 104\n\n[[routes]]\ncalling_ae_title = "ER_CR"\n'
                      'destinations = ["archive"]\n')
    result = pacs_ai_cli("serve", "--config", str(config), timeout=60)
    assert result.returncode == 2, result.stderr
    assert "[[routes]] #1 destinations: 'archive' is not the name of a [[destinations]] " \
           "block; the destinations are 'main'" in result.stderr
    assert not (tmp_path / "spool").exists()  # nothing started
