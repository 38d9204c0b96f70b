"""The model file contract: what the service accepts, and what it refuses with a clear message."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pacs_ai.model.model import METADATA_FILE, ModelContractError, PneumoniaModel
from testbed.tiny_models import export_untrained_tiny_model
from training.export import build_metadata


class TinyNet(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3)) * 4 - 2


def save_scripted(path, metadata=None, network=None):
    scripted = torch.jit.script(network or TinyNet())
    extra = {METADATA_FILE: json.dumps(metadata)} if metadata is not None else {}
    torch.jit.save(scripted, str(path), _extra_files=extra)
    return path


def valid_metadata(**changes):
    metadata = build_metadata(name="t", version="1", threshold=0.4, threshold_rule="test")
    metadata.update(changes)
    return metadata


def test_a_valid_file_loads_and_predicts_probabilities(tmp_path):
    model = PneumoniaModel.load(save_scripted(tmp_path / "m.pt", valid_metadata()))
    batch = np.full((3, 1, 200, 200), 0.75, dtype=np.float32)
    probabilities = model.predict(batch)
    assert probabilities.shape == (3,)
    assert np.allclose(probabilities, 1 / (1 + np.exp(-1.0)))  # sigmoid(0.75 * 4 - 2)
    assert model.finding(0.4) == "pneumonia" and model.finding(0.39) == "normal"


def test_probability_output_is_not_squashed_twice(tmp_path):
    model = PneumoniaModel.load(save_scripted(tmp_path / "m.pt", valid_metadata(output="probability")))
    assert np.allclose(model.predict(np.full((1, 1, 200, 200), 0.75, np.float32)), 1.0)


def test_file_without_metadata_is_refused(tmp_path):
    with pytest.raises(ModelContractError, match="no pacs_ai.json metadata"):
        PneumoniaModel.load(save_scripted(tmp_path / "m.pt"))


@pytest.mark.parametrize("changes, message", [
    ({"input": {"shape": [1, 224, 224], "preprocessing": "pacs_ai.imaging.to_model_input/v1"}},
     "input shape"),
    ({"input": {"shape": [1, 200, 200], "preprocessing": "something-else"}}, "preprocessing"),
    ({"format": "other/9"}, "format"),
    ({"threshold": 1.5}, "threshold"),
    ({"output": "softmax"}, "output kind"),
    ({"positive_class": "normal"}, "pneumonia"),
])
def test_incompatible_metadata_is_refused_naming_the_problem(tmp_path, changes, message):
    with pytest.raises(ModelContractError, match=message):
        PneumoniaModel.load(save_scripted(tmp_path / "m.pt", valid_metadata(**changes)))


def test_missing_keys_are_named(tmp_path):
    metadata = valid_metadata()
    del metadata["threshold"], metadata["version"]
    with pytest.raises(ModelContractError, match="threshold"):
        PneumoniaModel.load(save_scripted(tmp_path / "m.pt", metadata))


def test_network_with_wrong_output_shape_is_refused(tmp_path):
    class TwoOutputs(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3)).repeat(1, 2)

    with pytest.raises(ModelContractError, match="output"):
        PneumoniaModel.load(save_scripted(tmp_path / "m.pt", valid_metadata(), TwoOutputs()))


def test_not_a_model_file_and_missing_file_are_refused(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ModelContractError, match="not a TorchScript"):
        PneumoniaModel.load(junk)
    with pytest.raises(ModelContractError, match="not found"):
        PneumoniaModel.load(tmp_path / "absent.pt")
    # the two that torch or the check above misnamed: a folder was "not found", an empty file
    # "istream reader failed: getting the current position"
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(ModelContractError, match="model file is not a file: .*folder.pt"):
        PneumoniaModel.load(tmp_path / "folder.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ModelContractError, match="model file is empty: .*empty.pt"):
        PneumoniaModel.load(tmp_path / "empty.pt")


def test_cli_prints_a_message_not_a_traceback(tmp_path):
    path = save_scripted(tmp_path / "m.pt", valid_metadata(input={"shape": [1, 64, 64]}))
    result = subprocess.run([sys.executable, "-m", "pacs_ai", "model", "--model", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "input shape" in result.stderr
    assert "Traceback" not in result.stderr


def test_model_command_prints_the_card(tmp_path):
    path = export_untrained_tiny_model(tmp_path / "tiny.pt", threshold=0.3)
    result = subprocess.run([sys.executable, "-m", "pacs_ai", "model", "--model", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tiny-test-model 0.0.0-test" in result.stdout
    assert "0.3000" in result.stdout


def test_model_command_shows_the_model_the_config_uses(tmp_path):
    """Issue 14: `pacs-ai model` without --model showed the shipped model, not the one the
    service loads; with --config it reads [model] path and states the site's settings."""
    from pacs_ai.model.site_threshold import file_sha256

    site_model = export_untrained_tiny_model(tmp_path / "site.pt", threshold=0.3)
    config = tmp_path / "pacs-ai.toml"
    config.write_text(f'[model]\npath = "{site_model}"\nthreshold = 0.42\nmax_age_years = 17\n'
                      'unknown_age = "skip"\nthreshold_model_version = "0.0.0-test"\n'
                      f'threshold_model_sha256 = "{file_sha256(site_model)}"\n')
    result = subprocess.run([sys.executable, "-m", "pacs_ai", "model", "--config", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"file:       {site_model} ([model] path in {config})" in result.stdout
    assert f"sha256:     {file_sha256(site_model)}" in result.stdout
    assert "0.3000" in result.stdout  # the file's own threshold, then the site's
    assert (f"site:       threshold 0.4200, ages 0-17 years, films without an age skipped "
            f"([model] in {config}") in result.stdout
    as_json = subprocess.run([sys.executable, "-m", "pacs_ai", "model", "--config", str(config),
                              "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(as_json.stdout)["threshold"] == 0.3
