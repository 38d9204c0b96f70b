"""A site threshold bound to its model file (issue 24 item 5): the config keys, the check at
start-up (a real `pacs-ai serve` refusing a threshold chosen for another file), the lines
`pacs-ai evaluate` proposes, and the proposal rule itself.

The other model file is the shipped one: its version and digest are read from the file, never
written here (it is replaced from time to time)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from pacs_ai.config import ConfigError, SiteThreshold, default_model_path, load_config
from pacs_ai.evaluate.site_evaluation import proposed_threshold, summarise
from pacs_ai.model.model import PneumoniaModel
from pacs_ai.model.site_threshold import (ThresholdForAnotherModel, binding_problem, check_binding,
                                          file_sha256, threshold_lines)
from testbed.dicom_peers import ServiceProcess, pacs_ai_cli, write_service_config

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def shipped() -> PneumoniaModel:
    return PneumoniaModel.load(default_model_path())


@pytest.fixture(scope="module")
def distance_model(tmp_path_factory) -> Path:
    """A tiny ensemble whose out-of-distribution score is a Mahalanobis distance (1.2.1's
    kind), abstaining above 40."""
    from testbed.tiny_models import export_untrained_tiny_ensemble

    return export_untrained_tiny_ensemble(tmp_path_factory.mktemp("distance") / "distance.pt",
                                          ood_threshold=40.0)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pacs-ai.toml"
    path.write_text(text)
    return path


# --- the config keys ---------------------------------------------------------------------------

def test_the_binding_keys_are_read(tmp_path):
    digest = "AB" * 32
    config = load_config(write(tmp_path, '[model]\nthreshold = 0.41\nthreshold_model_version = '
                                         f'"1.3.0"\nthreshold_model_sha256 = "{digest}"\n'))
    assert config.model.site_threshold == SiteThreshold("[model]", 0.41, "1.3.0", digest.lower())
    config = load_config(write(tmp_path, "[model]\nthreshold = 0.41\n"
                                         "threshold_for_any_model = true\n"))
    assert config.model.site_threshold.for_any_model


@pytest.mark.parametrize("text, message", [
    ('threshold_model_version = "1.3.0"\nthreshold_model_sha256 = "' + "a" * 64 + '"\n',
     "[model] threshold_model_version: is set but neither threshold nor ood_threshold is"),
    ('threshold = 0.4\nthreshold_model_version = "1.3.0"\n',
     "[model] threshold_model_sha256: missing"),
    ('threshold = 0.4\nthreshold_model_sha256 = "' + "a" * 64 + '"\n',
     "[model] threshold_model_version: missing"),
    ('threshold = 0.4\nthreshold_model_version = "1"\nthreshold_model_sha256 = "abc"\n',
     "[model] threshold_model_sha256: expected the model file's SHA-256"),
    ('threshold = 0.4\nthreshold_model_version = ""\nthreshold_model_sha256 = "' + "a" * 64
     + '"\n', "[model] threshold_model_version: is empty"),
    ('threshold = 0.4\nthreshold_for_any_model = true\nthreshold_model_version = "1"\n'
     'threshold_model_sha256 = "' + "a" * 64 + '"\n', "[model] threshold_for_any_model: true, yet"),
    ("threshold_for_any_model = true\n",
     "[model] threshold_for_any_model: is set but neither threshold nor ood_threshold is"),
])
def test_inconsistent_binding_keys_stop_with_the_key_named(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, "[model]\n" + text))
    assert message in str(error.value)


def test_the_binding_keys_bind_an_ood_threshold_too(tmp_path):
    """An ood_threshold is a threshold on one file's score (a gate's probability, another's
    Mahalanobis distance): the same keys say which file it was chosen for, with or without a
    decision threshold beside it."""
    digest = "cd" * 32
    config = load_config(write(tmp_path, '[model]\nood_threshold = 0.02\nthreshold_model_version'
                                         f' = "1.3.0"\nthreshold_model_sha256 = "{digest}"\n'))
    assert config.model.site_threshold == SiteThreshold("[model]", None, "1.3.0", digest,
                                                        ood_value=0.02)
    config = load_config(write(tmp_path, "[model]\nthreshold = 0.4\nood_threshold = 0.02\n"
                                         "threshold_for_any_model = true\n"))
    assert config.model.site_threshold == SiteThreshold("[model]", 0.4, for_any_model=True,
                                                        ood_value=0.02)
    config = load_config(write(tmp_path, "[model]\nood_threshold = 0.02\n"))
    assert config.model.site_threshold == SiteThreshold("[model]", ood_value=0.02)


# --- the check --------------------------------------------------------------------------------

def test_a_threshold_is_used_only_with_the_file_it_was_chosen_for(tiny_model, shipped):
    tiny = PneumoniaModel.load(tiny_model)
    assert tiny.sha256 == file_sha256(tiny_model)
    for_tiny = SiteThreshold("[model]", 0.41, tiny.info.version, tiny.sha256)
    assert binding_problem(for_tiny, tiny.info, tiny.sha256) is None
    problem = binding_problem(for_tiny, shipped.info, shipped.sha256)
    assert problem is not None and "\n" not in problem
    # both versions named, and what to do
    assert f"chosen for model version {tiny.info.version}" in problem
    assert f"the model file is {shipped.info.label} (version {shipped.info.version}" in problem
    assert "pacs-ai evaluate" in problem and "threshold_for_any_model = true" in problem
    with pytest.raises(ThresholdForAnotherModel):
        check_binding(for_tiny, shipped.info, shipped.sha256)
    # the override, and no threshold at all, are used with any file
    for setting in (SiteThreshold("[model]", 0.41, for_any_model=True), SiteThreshold("[model]")):
        assert binding_problem(setting, shipped.info, shipped.sha256) is None
    # a bare threshold does not say which file it is for: refused, with the lines to add
    bare = binding_problem(SiteThreshold("[model]", 0.41), shipped.info, shipped.sha256)
    assert "does not say which model file" in bare
    assert f'threshold_model_sha256 = "{shipped.sha256}"' in bare


@pytest.mark.real_peer
def test_the_service_refuses_a_threshold_chosen_for_another_model(tmp_path, tiny_model, shipped):
    """`pacs-ai serve` with [model] path the tiny model and a threshold proposed for the shipped
    one: exit 2 and one line naming both versions, before the listener opens."""
    config = write_service_config(tmp_path, model=tiny_model, tables={"model": {
        "threshold": 0.3, "threshold_model_version": shipped.info.version,
        "threshold_model_sha256": shipped.sha256}})
    line = refusal_at_start(config)
    assert f"chosen for model version {shipped.info.version}" in line
    assert "tiny-test-model 0.0.0-test (version 0.0.0-test" in line


def refusal_at_start(config: Path) -> str:
    """`pacs-ai serve`'s one error line, having checked it stopped (exit 2, no traceback)
    before the service started."""
    result = pacs_ai_cli("serve", "--config", str(config), timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if "pacs-ai serve: error:" in line]
    assert "Traceback" not in result.stderr
    assert not any(json.loads(entry).get("event") == "service_started"
                   for entry in result.stderr.splitlines() if entry.startswith("{"))
    return line


@pytest.mark.real_peer
@pytest.mark.parametrize("key, value, in_force", [
    ("threshold", 0.3, "service_started"), ("ood_threshold", 1e9, "ood_threshold_overridden")])
def test_an_admin_may_keep_a_threshold_for_any_model(tmp_path, distance_model, key, value,
                                                     in_force):
    """threshold_for_any_model = true covers either key: used, with a warning naming it."""
    config = write_service_config(tmp_path, model=distance_model, tables={
        "model": {key: value, "threshold_for_any_model": True},
        "workers": {"count": 1, "processes": 0}})
    with ServiceProcess(config, tmp_path / "serve.log") as service:
        assert service.terminate() == 0
    events = {event["event"]: event for event in service.events()}
    warning = events["threshold_for_any_model"]
    assert warning["level"] == "warning" and warning[key] == value and key in warning["detail"]
    assert events[in_force][key] == value


def test_the_proposed_lines_are_accepted_for_their_file_only(tmp_path, tiny_model, shipped):
    """What `pacs-ai evaluate` prints, pasted into a config: `pacs-ai model --config` (the
    service's check) takes it for the tiny model and refuses it for the shipped one."""
    tiny = PneumoniaModel.load(tiny_model)
    lines = threshold_lines("model", "0.412344", tiny.info, tiny.sha256)
    config = write(tmp_path, lines + f'\npath = "{tiny_model}"\n')
    result = pacs_ai_cli("model", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "site:       threshold 0.4123" in result.stdout
    other = pacs_ai_cli("model", "--config", str(config), "--model", str(shipped.path))
    assert other.returncode == 2
    assert f"the model file is {shipped.info.label}" in other.stderr
    assert other.stdout == "", "no card for a config the service would refuse"
    # --json makes the same check (it printed the metadata and exited 0 before)
    as_json = pacs_ai_cli("model", "--config", str(config), "--model", str(shipped.path), "--json")
    assert as_json.returncode == 2 and as_json.stdout == ""
    assert f"the model file is {shipped.info.label}" in as_json.stderr
    accepted = pacs_ai_cli("model", "--config", str(config), "--json")
    assert accepted.returncode == 0 and json.loads(accepted.stdout)["version"] == \
        tiny.info.version


# --- an ood_threshold, bound the same way -----------------------------------------------------

def test_an_ood_threshold_is_used_only_with_the_file_it_was_chosen_for(distance_model, shipped):
    """1.3.0's gate scores are probabilities, 1.2.1's a Mahalanobis distance: a gate's 0.02 kept
    through a rollback would abstain on every film. So an ood_threshold bound to another file,
    or to none, stops start-up as a decision threshold does."""
    distance = PneumoniaModel.load(distance_model)
    for_shipped = SiteThreshold("[model]", None, shipped.info.version, shipped.sha256,
                                ood_value=0.02)
    assert binding_problem(for_shipped, shipped.info, shipped.sha256) is None
    problem = binding_problem(for_shipped, distance.info, distance.sha256)
    assert problem is not None and "\n" not in problem
    assert problem.startswith(f"[model] ood_threshold 0.02 was chosen for model version "
                              f"{shipped.info.version}")
    assert f"the model file is {distance.info.label} (version {distance.info.version}" in problem
    assert "pacs-ai evaluate" in problem and "threshold_for_any_model = true" in problem
    assert "remove ood_threshold to use the file's own" in problem
    # both set: both named, as one binding covers the table
    both = binding_problem(SiteThreshold("[model]", 0.4, shipped.info.version, shipped.sha256,
                                         ood_value=0.02), distance.info, distance.sha256)
    assert both.startswith("[model] threshold 0.4 and ood_threshold 0.02 were chosen for")
    bare = binding_problem(SiteThreshold("[model]", ood_value=0.02), distance.info, distance.sha256)
    assert bare.startswith("[model] ood_threshold 0.02 does not say which model file")
    assert f'threshold_model_sha256 = "{distance.sha256}"' in bare
    assert binding_problem(SiteThreshold("[model]", for_any_model=True, ood_value=0.02),
                           distance.info, distance.sha256) is None


@pytest.mark.real_peer
@pytest.mark.parametrize("bound_to_shipped", [True, False])
def test_the_service_refuses_an_ood_threshold_chosen_for_another_model_or_none(
        tmp_path, distance_model, shipped, bound_to_shipped):
    """`pacs-ai serve` with a model whose score is a distance and the gate's ood_threshold:
    exit 2 before the listener opens, one line naming the key and the fix."""
    model = {"ood_threshold": 0.02}
    if bound_to_shipped:
        model.update(threshold_model_version=shipped.info.version,
                     threshold_model_sha256=shipped.sha256)
    line = refusal_at_start(write_service_config(tmp_path, model=distance_model,
                                                 tables={"model": model}))
    assert "[model] ood_threshold 0.02" in line
    assert ((f"chosen for model version {shipped.info.version}" in line) if bound_to_shipped
            else ("does not say which model file" in line))
    assert "tiny-test-ensemble 0.0.0-test" in line and "threshold_for_any_model = true" in line


def test_the_model_command_checks_an_ood_threshold_binding(tmp_path, distance_model, shipped):
    """`pacs-ai model --config` refuses what start-up would, without starting."""
    distance = PneumoniaModel.load(distance_model)
    config = write(tmp_path, f'[model]\npath = "{distance_model}"\nood_threshold = 50\n')
    refused = pacs_ai_cli("model", "--config", str(config))
    assert refused.returncode == 2
    assert "[model] ood_threshold 50 does not say which model file" in refused.stderr
    config.write_text(f'[model]\npath = "{distance_model}"\nood_threshold = 50\n'
                      f'threshold_model_version = "{distance.info.version}"\n'
                      f'threshold_model_sha256 = "{distance.sha256}"\n')
    result = pacs_ai_cli("model", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "site:       abstention above 50.000" in result.stdout
    other = pacs_ai_cli("model", "--config", str(config), "--model", str(shipped.path))
    assert other.returncode == 2
    assert (f"[model] ood_threshold 50 was chosen for model version {distance.info.version}"
            in other.stderr)


def test_the_proposed_lines_keep_an_ood_threshold_bound(distance_model):
    distance = PneumoniaModel.load(distance_model)
    lines = threshold_lines("model", "0.412344", distance.info, distance.sha256, ood_threshold=50.0)
    assert lines == ("[model]\nthreshold = 0.412344\nood_threshold = 50.0\n"
                     f'threshold_model_version = "{distance.info.version}"\n'
                     f'threshold_model_sha256 = "{distance.sha256}"')


# --- the proposal ------------------------------------------------------------------------------

def separated_rows(normals: int = 30, pneumonias: int = 30) -> list[dict]:
    """Perfectly separated films: every pneumonia above every normal, the pneumonias close to
    1 (as a confident model gives them)."""
    rng = np.random.default_rng(7)
    normal = np.sort(rng.uniform(0.001, 0.2, normals))
    pneumonia = np.sort(rng.uniform(0.99, 0.9999, pneumonias))
    return ([{"label": "normal", "status": "ok", "probability": float(p), "reason": None}
             for p in normal]
            + [{"label": "pneumonia", "status": "ok", "probability": float(p), "reason": None}
               for p in pneumonia])


def test_on_perfectly_separated_films_no_sensitivity_is_given_up():
    """Issue 24: the highest threshold keeping a 0.95 floor dropped one pneumonia of 30
    (sensitivity 1.000 -> 0.967) for no specificity; the proposal keeps them all."""
    rows = separated_rows()
    pneumonia = sorted(r["probability"] for r in rows if r["label"] == "pneumonia")
    summary = summarise(rows, threshold=0.5, floor=0.95,
                        config_lines=lambda t: f"[model]\nthreshold = {t}")
    proposal = summary["proposed_threshold"]
    assert proposal["threshold"] < pneumonia[0]  # every pneumonia found ...
    assert proposal["sensitivity"] == 1.0 and proposal["specificity"] == 1.0
    normal = max(r["probability"] for r in rows if r["label"] == "normal")
    assert proposal["threshold"] > normal  # ... and every normal cleared
    # just below the lowest pneumonia, as written into the config
    assert proposal["threshold"] == round(pneumonia[0] - 1e-6, 6)


def test_among_equally_specific_thresholds_the_most_sensitive_is_proposed():
    # normals 0.1-0.4 and one at 0.75; pneumonias 0.5, 0.6, 0.7 (below that normal), 0.8-0.95
    normal = [0.1, 0.2, 0.3, 0.4, 0.75]
    pneumonia = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]
    probabilities = np.array(normal + pneumonia)
    labels = np.array([0] * len(normal) + [1] * len(pneumonia))
    # floor 0.5: 0.8 keeps 4 of 7 with every normal cleared; nothing lower clears them all
    assert proposed_threshold(probabilities, labels, 0.5) == round(0.8 - 1e-6, 6)
    # floor 0.9: 0.7 keeps 5 of 7, too few; 0.6 keeps 6 (0.857) still too few; 0.5 keeps all
    assert proposed_threshold(probabilities, labels, 0.9) == round(0.5 - 1e-6, 6)
    # floor 0.7: 0.7 keeps 5/7 = 0.714 and clears 4 normals; 0.6 and 0.5 clear no more
    assert proposed_threshold(probabilities, labels, 0.7) == round(0.5 - 1e-6, 6)


def test_the_rule_is_stated_in_the_summary():
    summary = summarise(separated_rows(), threshold=0.5, floor=0.95,
                        config_lines=lambda t: f"[model]\nthreshold = {t}")
    rule = summary["proposed_threshold"]["rule"]
    assert re.search(r"the most specific; of those, the one that keeps the most pneumonias",
                     rule)
