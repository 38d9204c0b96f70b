"""Abstention on films unlike the training films: the ensemble's out-of-distribution score,
carried in the model file, and the service and `pacs-ai classify` skipping such films with
reason `out-of-distribution` and the score, sending no finding."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from pacs_ai.model.model import PneumoniaModel
from testbed.dicom_peers import wait_until
from testbed.environment import SAMPLE_DICOMS
from testbed.job_queue import all_jobs
from testbed.tiny_models import export_untrained_tiny_ensemble
from tests.test_classify_cli import classify
from tests.test_worker import backlog, worker_for  # noqa: F401  (backlog: a fixture)
from training.ensemble import EnsembleNetwork, fit_gaussians, fit_ood
from training.models import pacs_cnn

CHEST_FILM = SAMPLE_DICOMS / "cr_normal_pa_12bit.dcm"


def test_the_mahalanobis_fit_scores_class_means_zero_and_far_points_high():
    rng = np.random.default_rng(0)
    features = np.r_[rng.normal(0, 1, (500, 4)), rng.normal(3, 1, (500, 4))]
    labels = np.r_[np.zeros(500, int), np.ones(500, int)]
    means, precision = fit_gaussians(features, labels)
    assert np.allclose(means, [[0] * 4, [3] * 4], atol=0.2)

    def score(point):
        return min(float((point - m) @ precision @ (point - m)) for m in means)

    assert score(means[1]) == pytest.approx(0, abs=1e-9)
    assert score(np.full(4, 1.5)) < score(np.full(4, 10.0))
    assert score(np.full(4, 10.0)) > 100


def test_the_ensemble_averages_its_members_logits_and_scripts_with_its_ood_method():
    torch.manual_seed(0)
    members = [pacs_cnn(widths=(4, 8, 8), downsample=2).eval() for _ in range(3)]
    ensemble = EnsembleNetwork(members).eval()
    inputs = torch.rand(4, 1, 200, 200)
    fit_ood(ensemble, torch.rand(12, 200, 200).numpy(), np.arange(12) % 2)
    with torch.inference_mode():
        expected = torch.stack([m(inputs) for m in members]).mean(0)
        scripted = torch.jit.script(ensemble)
        logits, scores = scripted.forward_with_ood(inputs)
        assert torch.allclose(scripted(inputs), expected, atol=1e-5)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert scores.shape == (4,) and bool((scores > 0).all())


def test_films_far_from_the_fitted_ones_score_higher(tmp_path):
    """Fitted on one chest film's rank-equalised variants, a checkerboard scores far higher."""
    from pacs_ai.config import FilterPolicy
    from pacs_ai.film.film_input import DEFAULT_MAX_PIXELS, prepare
    from pacs_ai.model.preprocessing import to_model_input

    film = prepare(CHEST_FILM, FilterPolicy(), DEFAULT_MAX_PIXELS).model_input[0]
    rng = np.random.default_rng(1)
    variants = np.stack([np.clip(film + rng.normal(0, 0.02, film.shape), 0, 1)
                         for _ in range(24)]).astype(np.float32)
    path = export_untrained_tiny_ensemble(tmp_path / "ens.pt", ood_threshold=1.0,
                                          fit_inputs=variants)
    model = PneumoniaModel.load(path)
    checkerboard = to_model_input(np.indices((200, 200)).sum(0) % 2 * 255)
    _, scores = model.assess(np.stack([film[None], checkerboard]).astype(np.float32))
    assert scores[1] > 5 * scores[0]


@pytest.mark.parametrize("ood_threshold, expected_status", [(1e-6, "skipped"), (1e9, "ok")])
def test_classify_abstains_above_the_model_threshold(tmp_path, ood_threshold, expected_status):
    path = export_untrained_tiny_ensemble(tmp_path / "ens.pt", ood_threshold=ood_threshold)
    code, results, stderr = classify("--model", str(path), str(CHEST_FILM))
    assert len(results) == 1, stderr
    result = results[0]
    assert result["status"] == expected_status
    assert result["ood_score"] > 0
    if expected_status == "skipped":
        assert code == 1  # nothing could be classified
        assert result["reason"].startswith("out-of-distribution: score ")
        assert result["finding"] is None
    else:
        assert result["finding"] in ("normal", "pneumonia") and "reason" not in result


def test_the_service_skips_films_the_model_abstains_on_and_sends_no_report(backlog, tmp_path):  # noqa: F811
    spool, store = backlog
    model = PneumoniaModel.load(export_untrained_tiny_ensemble(tmp_path / "ens.pt",
                                                               ood_threshold=1e-6))
    stop = threading.Event()
    worker = worker_for(spool, store, model, stop)
    worker.start()
    try:
        assert wait_until(lambda: store.job_counts()["skipped"] == 5, 60), store.job_counts()
    finally:
        stop.set()
        worker.join(timeout=10)
    jobs = all_jobs(store)
    assert all(job.reason.startswith("out-of-distribution: score ") for job in jobs)
    assert all(job.report_uid is None for job in jobs)
    assert list(spool.outbox.iterdir()) == []


def test_the_site_can_move_the_abstention_threshold_and_start_up_says_so(tmp_path):
    import structlog

    from pacs_ai.config import parse_config
    from pacs_ai.errors import UserError
    from pacs_ai.model.intended_use import log_site_model_info, site_model_info
    from testbed.tiny_models import export_untrained_tiny_model

    model = PneumoniaModel.load(export_untrained_tiny_ensemble(tmp_path / "ens.pt",
                                                               ood_threshold=2.0))
    config = parse_config({"model": {"ood_threshold": 5.5}}, base_dir=tmp_path)
    site = site_model_info(model.info, ood_threshold=config.model.ood_threshold)
    assert site.ood_threshold == 5.5 and model.info.ood_threshold == 2.0
    model.info = site
    assert model.abstain_reason(5.0) is None and model.abstain_reason(6.0).startswith(
        "out-of-distribution: score 6.00 above 5.50")
    with structlog.testing.capture_logs() as logs:
        log_site_model_info(PneumoniaModel.load(tmp_path / "ens.pt").info, site)
    overridden = [e for e in logs if e["event"] == "ood_threshold_overridden"]
    assert overridden and overridden[0]["model_ood_threshold"] == 2.0

    plain = PneumoniaModel.load(export_untrained_tiny_model(tmp_path / "plain.pt"))
    with pytest.raises(UserError, match="no out-of-distribution score"):
        site_model_info(plain.info, ood_threshold=3.0)
    with pytest.raises(UserError, match="ood_threshold"):
        parse_config({"model": {"ood_threshold": 0}}, base_dir=tmp_path)
