"""A film's finding: what the model says of it at the threshold in force. It is what the job
queue stores (jobs.finding), what the SR codes as Pneumonia Present or Absent, what the HL7
and FHIR results say, and a result label of pacs_ai_model_results_total. A StrEnum: each
member equals its string, so values read back from the queue or an SR compare equal."""

from __future__ import annotations

from enum import StrEnum


class Finding(StrEnum):
    PNEUMONIA = "pneumonia"  # probability at or above the threshold
    NORMAL = "normal"

    @classmethod
    def at(cls, probability: float, threshold: float) -> "Finding":
        return cls.PNEUMONIA if probability >= threshold else cls.NORMAL
