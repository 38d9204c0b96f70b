"""Which instances the model was made for (placeholder; the pixel issue completes it)."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset


@dataclass(frozen=True)
class FilterPolicy:
    modalities: tuple[str, ...] = ("CR", "DX")


def skip_reason(ds: Dataset, policy: FilterPolicy = FilterPolicy()) -> str | None:
    """None when the model may classify this instance, else a reason 'code: detail'."""
    modality = str(ds.get("Modality", ""))
    if modality not in policy.modalities:
        return f"unsupported-modality: Modality is {modality!r}, not one of {list(policy.modalities)}"
    return None
