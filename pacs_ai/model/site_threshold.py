"""A site's decision threshold, bound to the model file it was chosen for.

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
"""

from __future__ import annotations

import hashlib
import json
import os

import structlog

from pacs_ai.config import ANY_MODEL_KEY, SHA256_KEY, SiteThreshold, VERSION_KEY
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


def binding_problem(setting: SiteThreshold, info: ModelInfo, sha256: str) -> str | None:
    """None when the threshold may be used with this model file (none set, bound to this very
    file, or for any model); else the one-line reason it may not, with the fix."""
    if setting.value is None or setting.for_any_model:
        return None
    if setting.model_sha256 == sha256:
        return None
    table, value = setting.table, f"{setting.value:g}"
    fixes = (f"run `pacs-ai evaluate` with this model file and use the lines it proposes, remove "
             f"the threshold to use the file's own ({info.threshold:.4f}), or set "
             f"{ANY_MODEL_KEY} = true to keep it for any model file")
    if setting.model_sha256 is None:
        return (f"{table} threshold {value} does not say which model file it was chosen for, and "
                f"{table} model is {info.label} (sha256 {sha256[:12]}...): if it was chosen for "
                f'this file, add {VERSION_KEY} = "{info.version}" and {SHA256_KEY} = '
                f'"{sha256}"; else {fixes}')
    chosen_for = setting.model_version or "an unnamed version"
    return (f"{table} threshold {value} was chosen for model version {chosen_for} (sha256 "
            f"{setting.model_sha256[:12]}...), but the model file is {info.label} (version "
            f"{info.version}, sha256 {sha256[:12]}...): {fixes}")


def check_binding(setting: SiteThreshold, info: ModelInfo, sha256: str) -> None:
    """Raise ThresholdForAnotherModel when binding_problem finds one."""
    problem = binding_problem(setting, info, sha256)
    if problem is not None:
        raise ThresholdForAnotherModel(problem)


def apply_threshold_binding(setting: SiteThreshold, model: PneumoniaModel) -> None:
    """At start-up: stop on a threshold for another file; log one kept for any file."""
    check_binding(setting, model.info, model.sha256 or file_sha256(model.path))
    if setting.value is not None and setting.for_any_model:
        log.warning("threshold_for_any_model", table=setting.table, threshold=setting.value,
                    model=model.info.label,
                    detail=f"{ANY_MODEL_KEY} = true: this threshold is used whatever the model "
                           "file, without checking it was chosen for this one")


def threshold_lines(table: str, threshold: str, info: ModelInfo, sha256: str) -> str:
    """The config lines that set `threshold` (as written, e.g. "0.412344") for this model file."""
    return (f"[{table}]\nthreshold = {threshold}\n{VERSION_KEY} = {json.dumps(info.version)}\n"
            f'{SHA256_KEY} = "{sha256}"')
