"""A site's thresholds (decision and abstention), bound to the model file they were chosen for.

A threshold is a property of one model file: the same number means something else for a new
version, which may be calibrated differently (a vendor's newer model run at the older one's
threshold was less accurate until recalibrated on site). So `pacs-ai evaluate` writes the
threshold it proposes with the model's version and the file's SHA-256:

    [model]
    threshold = 0.41
    threshold_model_version = "1.3.0"
    threshold_model_sha256 = "9c1b..."

and the service, at start, refuses a threshold whose digest is not the loaded file's, with one
line naming both versions. A threshold without the two binding keys is refused as well (it
cannot say which file it was chosen for); an admin who wants one threshold whatever the file
sets `threshold_for_any_model = true`, which start-up logs as a warning. The `[shadow]` table's
threshold works the same way for the shadow model (pacs_ai.classify.shadow).

The table's `ood_threshold` is bound by the same two keys: it is a threshold on one file's
out-of-distribution score, whose scale is the file's own (1.3.0's gate gives a probability,
1.2.1's a Mahalanobis distance of about 10-60, so a gate's 0.02 kept through a rollback would
abstain on every film). One binding, and one `threshold_for_any_model`, covers both keys: the
lines `pacs-ai evaluate` proposes carry the ood_threshold it evaluated with.
"""

from __future__ import annotations

import hashlib
import json
import os

import structlog

from pacs_ai.config import ANY_MODEL_KEY, SHA256_KEY, VERSION_KEY, SiteThreshold
from pacs_ai.errors import UserError
from pacs_ai.model.model import ModelInfo, PneumoniaModel

log = structlog.get_logger()


class ThresholdForAnotherModel(UserError):
    """A site threshold set for another model file (or for none said): start-up stops."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def set_thresholds(setting: SiteThreshold) -> dict[str, float]:
    """The table's thresholds that are set, by key ({} when it sets neither)."""
    keys = {"threshold": setting.value, "ood_threshold": setting.ood_value}
    return {key: value for key, value in keys.items() if value is not None}


def binding_problem(setting: SiteThreshold, info: ModelInfo, sha256: str) -> str | None:
    """None when the table's thresholds may be used with this model file (none set, bound to
    this very file, or for any model); else the one-line reason they may not, with the fix."""
    thresholds = set_thresholds(setting)
    if not thresholds or setting.for_any_model:
        return None
    if setting.model_sha256 == sha256:
        return None
    table = setting.table
    named = " and ".join(f"{key} {value:g}" for key, value in thresholds.items())
    # one key or both: "it was" / "they were", "keep it" / "keep them"
    they, was, it = ("they", "were", "them") if len(thresholds) > 1 else ("it", "was", "it")
    fixes = (f"run `pacs-ai evaluate` with this model file and use the lines it proposes, remove "
             f"{' and '.join(thresholds)} to use the file's own ({_own(thresholds, info)}), or "
             f"set {ANY_MODEL_KEY} = true to keep {it} for any model file")
    if setting.model_sha256 is None:
        return (f"{table} {named} does not say which model file {they} {was} chosen for, and "
                f"{table} model is {info.label} (sha256 {sha256[:12]}...): if {they} {was} chosen "
                f'for this file, add {VERSION_KEY} = "{info.version}" and {SHA256_KEY} = '
                f'"{sha256}"; else {fixes}')
    chosen_for = setting.model_version or "an unnamed version"
    return (f"{table} {named} {was} chosen for model version {chosen_for} (sha256 "
            f"{setting.model_sha256[:12]}...), but the model file is {info.label} (version "
            f"{info.version}, sha256 {sha256[:12]}...): {fixes}")


def _own(thresholds: dict[str, float], info: ModelInfo) -> str:
    """The file's own values of the keys set, as the fix "remove them" would put in force."""
    own = []
    if "threshold" in thresholds:
        own.append(f"{info.threshold:.4f}")
    if "ood_threshold" in thresholds:
        own.append("none: it has no out-of-distribution score" if info.ood_threshold is None
                   else f"{info.ood_threshold:.4g}")
    return ", ".join(own)


def check_binding(setting: SiteThreshold, info: ModelInfo, sha256: str) -> None:
    """Raise ThresholdForAnotherModel when binding_problem finds one."""
    problem = binding_problem(setting, info, sha256)
    if problem is not None:
        raise ThresholdForAnotherModel(problem)


def apply_threshold_binding(setting: SiteThreshold, model: PneumoniaModel) -> None:
    """At start-up: stop on thresholds for another file; log those kept for any file."""
    check_binding(setting, model.info, model.sha256 or file_sha256(model.path))
    log_for_any_model(setting, model.info.label)


def log_for_any_model(setting: SiteThreshold, model_label: str) -> None:
    """The start-up warning for thresholds kept whatever the model file."""
    thresholds = set_thresholds(setting)
    if thresholds and setting.for_any_model:
        log.warning("threshold_for_any_model", table=setting.table, threshold=setting.value,
                    ood_threshold=setting.ood_value, model=model_label,
                    detail=f"{ANY_MODEL_KEY} = true: {' and '.join(thresholds)} used whatever "
                           "the model file, without checking they were chosen for this one")


def binding_keys(model: PneumoniaModel) -> dict[str, str]:
    """The keys that bind a table's thresholds to this model file, for configs that programs
    write (tests, benchmarks); people paste the lines `pacs-ai evaluate` proposes."""
    return {VERSION_KEY: model.info.version, SHA256_KEY: model.sha256 or file_sha256(model.path)}


def threshold_lines(table: str, threshold: str, info: ModelInfo, sha256: str, *,
                    ood_threshold: float | None = None) -> str:
    """The config lines that set `threshold` (as written, e.g. "0.412344") for this model file,
    with the `ood_threshold` it was evaluated with, if the site sets one: the binding lines
    bind the table's thresholds together, so lines without it would leave it unbound."""
    ood = "" if ood_threshold is None else f"ood_threshold = {float(ood_threshold)!r}\n"
    return (f"[{table}]\nthreshold = {threshold}\n{ood}{VERSION_KEY} = "
            f'{json.dumps(info.version)}\n{SHA256_KEY} = "{sha256}"')
