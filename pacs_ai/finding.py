"""A film's finding: what the model says of it at the threshold in force. It is what the job
queue stores (jobs.finding), what the SR codes as Pneumonia Present or Absent, what the HL7
and FHIR results say, and a result label of pacs_ai_model_results_total. A StrEnum: each
member equals its string, so values read back from the queue or an SR compare equal. And how a
probability is shown to a person (the heat-map image, the queue page)."""

from __future__ import annotations

from enum import StrEnum


class Finding(StrEnum):
    PNEUMONIA = "pneumonia"  # probability at or above the threshold
    NORMAL = "normal"

    @classmethod
    def at(cls, probability: float, threshold: float) -> "Finding":
        return cls.PNEUMONIA if probability >= threshold else cls.NORMAL


def probability_label(probability: float) -> str:
    """A probability as a radiologist reads it: "> 0.999" and "< 0.001" at the ends (three
    decimals would round 0.999998 to a certain-looking "1.000"), else three decimals."""
    value = float(probability)
    if not 0.0 <= value <= 1.0:  # also NaN
        raise ValueError(f"not a probability: {probability!r}")
    if value > 0.999:
        return "> 0.999"
    if value < 0.001:
        return "< 0.001"
    return f"{value:.3f}"
