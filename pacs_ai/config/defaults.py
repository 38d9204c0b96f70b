"""The defaults the config shares with the stages (the listener's port and AE title, the pixel
limit, the age bounds, the shipped model's path), kept here so that the config imports no stage.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
LOG_PRIORITY_PREFIXES = ("auto", "on", "off")
DEFAULT_PORT = 11112
DEFAULT_AE_TITLE = "PACS_AI"
DEFAULT_METRICS_PORT = 9108
AUTO = "auto"  # [workers] count / processes: derived at start-up (pacs_ai.classify.capacity)

# A 43 x 43 cm detector at 0.1 mm pixels is ~18.5 Mpx; 50 Mpx leaves room and bounds memory
# (float64 intermediate: 400 MB). [limits] max_pixels; pacs_ai.film.pixels' guard.
DEFAULT_MAX_PIXELS = 50_000_000
MAX_AGE_YEARS = 150  # an upper bound for age ranges; older stated ages are not believed
# [model] unknown_age: what to do with a film whose header gives no usable age
UNKNOWN_AGE_CLASSIFY = "classify"  # the default: the out-of-distribution gate alone decides
UNKNOWN_AGE_SKIP = "skip"  # recorded as skipped, reason `unknown-age`, no report
UNKNOWN_AGE_CHOICES = (UNKNOWN_AGE_CLASSIFY, UNKNOWN_AGE_SKIP)
SHIPPED_MODEL_FILENAME = "pacs-ai-pneumonia.pt"


def default_model_path() -> Path:
    """[model] path's default, the shipped model: $PACS_AI_MODEL, the source checkout, or the
    installed copy."""
    override = os.environ.get("PACS_AI_MODEL")
    if override:
        return Path(override)
    candidates = [
        Path(__file__).resolve().parents[2] / "deploy" / "models" / SHIPPED_MODEL_FILENAME,
        Path(sys.prefix) / "share" / "pacs-ai" / "models" / SHIPPED_MODEL_FILENAME,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]
