"""The TOML config: defaults, the documented example, and clear errors for every kind of mistake."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pacs_ai.config import (BoundAETitle, ConfigError, FilterPolicy, RetryPolicy, default_config,
                            load_config, parse_config)

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = REPO_ROOT / "deploy" / "pacs-ai.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pacs-ai.toml"
    path.write_text(text)
    return path


def test_default_config_is_the_local_one(tmp_path):
    config = default_config(tmp_path)
    assert config.listener.port == 11112
    assert config.listener.ae_title == "PACS_AI"
    assert config.storage.spool_dir == tmp_path.resolve() / "spool"
    assert config.destinations == ()
    assert config.model.path is None
    assert config.listener.allowed_calling_ae_titles == ()
    assert config.listener.accept_any_calling_ae  # the local try-out takes any caller
    assert load_config(None).storage.spool_dir == Path.cwd().resolve() / "spool"


def test_issue_keys_are_read(tmp_path):
    path = write(tmp_path, """
[listener]
ae_title = "AI_NODE"
host = "127.0.0.1"
port = 4242
allowed_calling_ae_titles = ["MODALITY", "CR_ROOM_2"]
sop_classes = ["ComputedRadiographyImageStorage", "1.2.840.10008.5.1.4.1.1.2"]
[storage]
spool_dir = "var/spool"
min_free_bytes = 0
[[destinations]]
ae_title = "PACS"
host = "pacs.example.org"
port = 104
[[destinations]]
name = "archive"
ae_title = "ARCHIVE"
host = "10.0.0.5"
port = 11113
calling_ae_title = "AI_OUT"
[retry]
initial_delay_seconds = 0.2
max_delay_seconds = 1
max_attempts = 5
[report]
sr_kind = "Comprehensive"
""")
    config = load_config(path)
    assert config.listener.ae_title == "AI_NODE"
    assert config.listener.port == 4242
    assert config.listener.allowed_calling_ae_titles == ("MODALITY", "CR_ROOM_2")
    assert config.listener.sop_classes == ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.2")
    assert config.storage.spool_dir == (tmp_path / "var" / "spool").resolve()  # relative to file
    assert [d.name for d in config.destinations] == ["PACS@pacs.example.org:104", "archive"]
    assert config.destinations[0].calling_ae_title == "AI_NODE"
    assert config.destinations[1].calling_ae_title == "AI_OUT"
    assert config.retry.max_attempts == 5 and config.retry.initial_delay_seconds == 0.2
    assert config.report.sr_kind == "comprehensive"
    assert config.source == path


def test_shipped_example_config_is_valid_and_documents_every_key(tmp_path, monkeypatch):
    text = EXAMPLE_CONFIG.read_text()
    # The example points at /var/lib and the shipped model; neither need exist to parse it.
    import tomllib
    data = tomllib.loads(text)
    data.get("model", {}).pop("path", None)
    data.get("tls", {}).clear()
    for destination in data.get("destinations", []):
        destination.pop("tls", None)
    config = parse_config(data, base_dir=tmp_path)
    assert config.listener.port == 11112
    # Every key the parser knows appears in the example (commented out or set).
    for section in ("listener", "limits", "storage", "model", "shadow", "workers", "report",
                    "retry", "log", "metrics", "status", "drift"):
        for field in dataclasses.fields(getattr(config, section)):
            assert f"{field.name} =" in text, f"[{section}] {field.name} is not documented"
    for name in FilterPolicy.field_names():
        assert f"{name} =" in text, f"[filters] {name} is not documented"
    for key in ("cert_file", "key_file", "ca_file", "require_client_cert", "calling_ae_title",
                "timeout_seconds", "[model]", "path =", "# [shadow]"):
        assert key in text


def test_connections_per_address_default_to_max_associations(tmp_path):
    assert parse_config({"limits": {"max_associations": 3}},
                        base_dir=tmp_path).limits.max_connections_per_address == 3
    assert parse_config({"limits": {"max_associations": 3, "max_connections_per_address": 5}},
                        base_dir=tmp_path).limits.max_connections_per_address == 5


@pytest.mark.parametrize("text, first_words", [
    # issue 23 item 8: the misspelt key of a destination, not "ae_title: is required"
    ('[[destinations]]\nae_tile = "PACS"\nhost = "pacs"\nport = 104\n',
     "[[destinations]] #1: unknown key 'ae_tile' (did you mean 'ae_title'?); the keys of "
     "[[destinations]] #1 are: kind, name, ae_title, host, port"),
    ('[[destinations]]\nkind = "dicomweb"\nulr = "https://pacs/dicom-web"\n',
     "[[destinations]] #1: unknown key 'ulr' (did you mean 'url'?); the keys of "
     "[[destinations]] #1 are: kind, name, url"),
    ("[listener]\nae_tilte = \"AI\"\n", "[listener]: unknown key 'ae_tilte' (did you mean "
                                         "'ae_title'?)"),
    ("[filters]\nmodality = [\"CR\"]\n", "[filters]: unknown key 'modality' (did you mean "
                                        "'modalities'?)"),
    ("[lisener]\nport = 104\n", "unknown table or key 'lisener' at the top level (did you mean "
                                "[listener]?)"),
    ("[listener]\nfoo = 1\n", "[listener]: unknown key 'foo'; the keys of [listener] are: "),
])
def test_an_unknown_key_is_named_first_with_the_key_it_is_close_to(tmp_path, text, first_words):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert str(caught.value).split(": ", 1)[1].startswith(first_words), str(caught.value)


def test_serve_names_a_misspelt_destination_key(tmp_path):
    """The admin's typo of issue 23 item 8, through `pacs-ai serve` as run."""
    from testbed.dicom_peers import pacs_ai_cli

    config = write(tmp_path, '[[destinations]]\nname = "main-pacs"\nae_tile = "PACS"\n'
                             'host = "pacs.example.org"\nport = 104\n')
    result = pacs_ai_cli("serve", "--config", str(config), timeout=60)
    assert result.returncode == 2, result.stderr
    assert "unknown key 'ae_tile' (did you mean 'ae_title'?)" in result.stderr
    assert "is required" not in result.stderr


@pytest.mark.parametrize("text, named", [
    ("[listener]\nport = \"11112\"\n", "[listener] port"),
    ("[listener]\nport = 70000\n", "[listener] port"),
    ("[listener]\nprot = 104\n", "unknown key 'prot'"),
    ("[listner]\nport = 104\n", "'listner'"),
    ("[listener]\nae_title = \"A_TITLE_LONGER_THAN_16\"\n", "[listener] ae_title"),
    ("[listener]\nallowed_calling_ae_titles = \"MODALITY\"\n", "allowed_calling_ae_titles"),
    ("[listener]\nsop_classes = [\"CTImageStorage\"]\n", "sop_classes"),
    ("[listener]\nallowed_peer_addresses = [\"10.0.0.300\"]\n", "allowed_peer_addresses"),
    ("[storage]\nmin_free_bytes = -1\n", "[storage] min_free_bytes"),
    ("[storage]\nkeep_source_images = \"yes\"\n", "keep_source_images"),
    ("[model]\npath = \"missing.pt\"\n", "[model] path"),
    ("[report]\nsr_kind = \"basic\"\n", "[report] sr_kind"),
    ("[[destinations]]\nae_title = \"PACS\"\nhost = \"h\"\n", "port"),
    ("[[destinations]]\nae_title = \"PACS\"\nhost = \"h\"\nport = 104\nportt = 1\n", "'portt'"),
    ("[[destinations]]\nae_title = \"P\"\nhost = \"h\"\nport = 104\n"
     "[[destinations]]\nae_title = \"P\"\nhost = \"h\"\nport = 104\n", "named"),
    ("destinations = 5\n", "destinations"),
    ("[retry]\ninitial_delay_seconds = 0\n", "[retry] initial_delay_seconds"),
    ("[retry]\ninitial_delay_seconds = 10\nmax_delay_seconds = 1\n", "max_delay_seconds"),
    ("[retry]\nmax_attempts = 0\nmax_age_seconds = 0\n", "max_attempts"),
    ("[log]\nlevel = \"loud\"\n", "[log] level"),
    ("[metrics]\nenabled = 1\n", "[metrics] enabled"),
    ("[limits]\nmax_pdu_bytes = 100\n", "max_pdu_bytes"),
    ("[limits]\nmax_associations = 0\n", "max_associations"),
    ("[limits]\nassociation_request_timeout_seconds = 0\n", "association_request_timeout_seconds"),
    ("[limits]\nmax_connections_per_address = 0\n", "max_connections_per_address"),
    ("[limits]\nmax_dataset_bytes = 1000\n", "max_dataset_bytes"),
    ("[workers]\ncount = 1.5\n", "[workers] count"),
    ("[tls]\ncert_file = \"cert.pem\"\n", "[tls] cert_file"),
    ("[filters]\nno_such_filter = true\n", "'no_such_filter'"),
    ("[filters]\nmodalities = \"CR\"\n", "[filters] modalities"),
    ("[drift]\nexpected_positive_rate = 0.2\n", "[drift] expected_positive_rate"),
    ("[drift]\nexpected_positive_rate = [0.4, 0.2]\n", "[drift] expected_positive_rate"),
    ("[drift]\nexpected_positive_rate = [0.1, 1.5]\n", "[drift] expected_positive_rate"),
    ("[drift]\nexpected_positive_rate = [\"0.1\", 0.3]\n", "[drift] expected_positive_rate"),
    ("[drift]\nmax_abstention_rate = 2\n", "[drift] max_abstention_rate"),
    ("[drift]\nmin_films = 0\n", "[drift] min_films"),
    ("[drift]\ndays = 0\n", "[drift] days"),
    ("[listener\nport = 1\n", "not valid TOML"),
    ("listener = 5\n", "[listener] must be a table"),
])
def test_bad_config_names_the_key(tmp_path, text, named):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert named in str(caught.value)
    assert str(path) in str(caught.value)


def test_calling_ae_titles_can_be_bound_to_addresses(tmp_path):
    """Issue 14 item 6: plain titles keep working; inline tables bind a title to addresses."""
    listener = load_config(write(tmp_path, (
        '[listener]\nallowed_calling_ae_titles = ["PLAIN", '
        '{ ae_title = "CR1", address = "10.1.2.0/24" }, '
        '{ ae_title = "CR1", address = "192.168.0.7" }, '
        '{ ae_title = "V6", address = "fd00::/8" }]\n'))).listener
    assert listener.allowed_calling_ae_titles == (
        "PLAIN", BoundAETitle("CR1", "10.1.2.0/24"), BoundAETitle("CR1", "192.168.0.7"),
        BoundAETitle("V6", "fd00::/8"))
    assert listener.calling_ae_titles == ("PLAIN", "CR1", "V6")
    assert listener.calling_ae_addresses == {"CR1": ("10.1.2.0/24", "192.168.0.7"),
                                             "V6": ("fd00::/8",)}
    plain = load_config(write(tmp_path, '[listener]\nallowed_calling_ae_titles = ["A"]\n'))
    assert plain.listener.calling_ae_addresses == {}


@pytest.mark.parametrize("entries, says", [
    ('[{ ae_title = "CR1", address = "10.1.2.300/24" }]', "address '10.1.2.300/24'"),
    ('[{ ae_title = "CR1", address = "host.example" }]', "not an IP address"),
    ('[{ ae_title = "CR1", address = 10 }]', "address must be a quoted IP address"),
    ('[{ ae_title = "CR1" }]', "address must be"),
    ('[{ address = "10.0.0.1" }]', "ae_title must be"),
    ('[{ ae_title = 5, address = "10.0.0.1" }]', "ae_title must be"),
    ('[{ ae_title = "A_TITLE_LONGER_THAN_16", address = "10.0.0.1" }]', "at most 16"),
    ('[{ ae_title = "CR1", address = "10.0.0.1", port = 104 }]', "unknown key 'port'"),
    ('[5]', "the entry 5"),
    ('{ ae_title = "CR1", address = "10.0.0.1" }', "expected a list"),
    ('["CR1", { ae_title = "CR1", address = "10.0.0.1" }]', "both plain"),
])
def test_bad_calling_ae_address_bindings_name_the_key(tmp_path, entries, says):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"[listener]\nallowed_calling_ae_titles = {entries}\n"))
    assert "[listener] allowed_calling_ae_titles" in str(caught.value)
    assert says in str(caught.value), str(caught.value)


def test_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_filters_table_builds_the_policy_generically(tmp_path):
    policy = load_config(write(tmp_path, '[filters]\nmodalities = ["DX"]\n')).filters
    assert isinstance(policy, FilterPolicy)
    assert policy.modalities == ("DX",)


def test_tls_files_are_checked(tmp_path):
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    config = load_config(write(tmp_path, '[tls]\ncert_file = "cert.pem"\nkey_file = "key.pem"\n'
                                         '[[destinations]]\nae_title = "P"\nhost = "h"\n'
                                         'port = 2762\ntls = true\n'))
    assert config.tls.enabled and config.tls.cert_file == (tmp_path / "cert.pem").resolve()
    assert config.destinations[0].tls is not None
    with pytest.raises(ConfigError, match="require_client_cert"):
        load_config(write(tmp_path, '[tls]\ncert_file = "cert.pem"\nkey_file = "key.pem"\n'
                                    'require_client_cert = true\n'))


def test_retry_policy_backs_off_exponentially_and_knows_its_limits():
    policy = RetryPolicy(initial_delay_seconds=1, max_delay_seconds=10, max_attempts=5,
                         max_age_seconds=100)
    assert [policy.delay_after(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert not policy.exhausted(4, 50)
    assert policy.exhausted(5, 50)
    assert policy.exhausted(1, 100)
    assert policy.delay_after(10_000) == 10  # no overflow



def test_no_file_and_an_empty_file_differ_only_in_taking_any_caller(tmp_path):
    """The dataclasses' defaults are the one source: the parser reads them for missing keys.
    The one difference: without a file (the local try-out) any calling AE title may store; a
    config file, like the installed one, refuses every caller until it names them."""
    empty_file = parse_config({}, base_dir=tmp_path)
    no_file = default_config(tmp_path)
    assert empty_file.listener.refuses_every_caller and not no_file.listener.refuses_every_caller
    assert empty_file == dataclasses.replace(
        no_file, listener=dataclasses.replace(no_file.listener, accept_any_calling_ae=False))


def test_a_config_file_takes_any_caller_only_when_it_says_so(tmp_path):
    named = load_config(write(tmp_path, '[listener]\nallowed_calling_ae_titles = ["CR1"]\n'))
    assert not named.listener.refuses_every_caller and not named.listener.accept_any_calling_ae
    anyone = load_config(write(tmp_path, "[listener]\naccept_any_calling_ae = true\n"))
    assert anyone.listener.accept_any_calling_ae and not anyone.listener.refuses_every_caller
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, '[listener]\naccept_any_calling_ae = true\n'
                                    'allowed_calling_ae_titles = ["CR1"]\n'))
    assert "[listener] accept_any_calling_ae" in str(caught.value)
    assert "allowed_calling_ae_titles" in str(caught.value)


def test_every_value_the_example_config_sets_is_the_code_default(tmp_path):
    """deploy/pacs-ai.toml shows the defaults of a config file; only the spool (the installed
    path) differs."""
    import tomllib
    data = tomllib.loads(EXAMPLE_CONFIG.read_text())
    data.get("model", {}).pop("path", None)
    data.get("tls", {}).clear()
    config = parse_config(data, base_dir=tmp_path)
    default = parse_config({}, base_dir=tmp_path)
    assert config.storage.spool_dir == Path("/var/lib/pacs-ai")
    assert config.listener.refuses_every_caller  # installed as is, it takes no caller
    differences = []
    for table in dataclasses.fields(config):
        ours, code = getattr(config, table.name), getattr(default, table.name)
        if not dataclasses.is_dataclass(ours):
            if ours != code and table.name != "source":
                differences.append(table.name)
            continue
        for key in dataclasses.fields(ours):
            if getattr(ours, key.name) != getattr(code, key.name):
                differences.append(f"[{table.name}] {key.name}")
    assert differences == ["[storage] spool_dir"]
