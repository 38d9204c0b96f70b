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
