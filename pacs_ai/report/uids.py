"""Deterministic DICOM UIDs for what pacs-ai creates.

Every UID pacs-ai writes is a name-based UUID (RFC 4122 version 5) under the ``2.25`` root, which
DICOM (PS3.5 B.2) allows without a registered org root. Being derived from names, the same inputs
always give the same UID: a re-sent image classified by the same model yields the same report
UID, so a PACS sees one report, not a second, different one.
"""

from __future__ import annotations

import uuid

# Fixed namespace for all pacs-ai name-based UUIDs (uuid5(NAMESPACE_URL, "urn:pacs-ai:uids")).
# Never change it: every UID already sent to a PACS was derived from it.
PACS_AI_UID_NAMESPACE = uuid.UUID("7af338f2-a458-53c0-ba3f-1134d5711094")

# Separates the name parts so ("ab", "c") and ("a", "bc") cannot give the same UID.
_PART_SEPARATOR = "\x1f"


def deterministic_uid(purpose: str, *parts: str) -> str:
    """``2.25.<uuid5 as integer>`` of ``purpose`` and ``parts``; at most 44 characters.

    ``purpose`` keeps UIDs of different kinds apart even when made from the same parts.
    """
    for part in (purpose, *parts):
        if not isinstance(part, str) or not part:
            raise ValueError(f"UID parts must be non-empty strings, got {part!r}")
        if _PART_SEPARATOR in part:
            raise ValueError(f"UID part {part!r} contains a control character")
    name = _PART_SEPARATOR.join((purpose, *parts))
    return f"2.25.{uuid.uuid5(PACS_AI_UID_NAMESPACE, name).int}"


def report_uid(source_sop_instance_uid: str, model_name: str, model_version: str,
               sr_kind: str | None = None, site_settings: str | None = None) -> str:
    """SOP Instance UID of the SR about one source image made by one model version. `sr_kind`
    names a non-default SR class: a report of another class is another instance, so it gets
    another UID (None, the default class, keeps the UIDs reports always had). `site_settings`
    likewise names settings that differ from the model file's (pacs_ai.report.report)."""
    parts = [str(source_sop_instance_uid), model_name, model_version]
    if sr_kind is not None:
        parts.append(f"sr-kind={sr_kind}")
    if site_settings is not None:
        parts.append(site_settings)
    return deterministic_uid("sr-instance", *parts)


def report_series_uid(study_instance_uid: str, model_name: str, model_version: str) -> str:
    """Series Instance UID shared by all SRs of one model version within one study."""
    return deterministic_uid("sr-series", str(study_instance_uid), model_name, model_version)


def tracking_uid(source_sop_instance_uid: str, model_name: str, model_version: str) -> str:
    """Tracking Unique Identifier of the measurement group (the finding) in the SR."""
    return deterministic_uid("tracking", str(source_sop_instance_uid), model_name, model_version)


def region_tracking_uid(source_sop_instance_uid: str, model_name: str, model_version: str) -> str:
    """Tracking Unique Identifier of the SR's region group (TID 1410: where the finding is)."""
    return deterministic_uid("region-tracking", str(source_sop_instance_uid), model_name,
                             model_version)


def heatmap_uid(source_sop_instance_uid: str, model_name: str, model_version: str,
                site_settings: str | None = None) -> str:
    """SOP Instance UID of the heat-map image (Secondary Capture) of one source image made by
    one model version: a re-sent image gives the same one. `site_settings` as for
    report_uid (the outline drawn depends on the threshold in force)."""
    parts = [str(source_sop_instance_uid), model_name, model_version]
    if site_settings is not None:
        parts.append(site_settings)
    return deterministic_uid("heatmap-instance", *parts)


def heatmap_series_uid(study_instance_uid: str, model_name: str, model_version: str) -> str:
    """Series Instance UID shared by the heat-map images of one model version in one study."""
    return deterministic_uid("heatmap-series", str(study_instance_uid), model_name,
                             model_version)


def device_observer_uid(model_name: str, model_version: str) -> str:
    """Device Observer UID naming the algorithm (one per model version) as the observer."""
    return deterministic_uid("device-observer", model_name, model_version)


def message_control_id(report_uid: str) -> str:
    """MSH-10 of the HL7 result message about one report: 20 characters (HL7 v2.5.1's limit)
    derived from the report's UID, so a message sent again (its ACK lost, the service killed
    before it recorded the ACK) carries the control ID the RIS has seen, and is known to it as
    the same message. 80 bits of a name-based UUID: no two reports meet by chance."""
    if not isinstance(report_uid, str) or not report_uid:
        raise ValueError(f"a report UID is needed, got {report_uid!r}")
    name = _PART_SEPARATOR.join(("hl7-message-control-id", report_uid))
    return uuid.uuid5(PACS_AI_UID_NAMESPACE, name).hex[:20].upper()


def result_resource_uuid(kind: str, uid: str) -> str:
    """A FHIR transaction entry's fullUrl (urn:uuid:...) for the resource made from `uid`: the
    same on every re-send."""
    name = _PART_SEPARATOR.join(("fhir-entry", kind, uid))
    return f"urn:uuid:{uuid.uuid5(PACS_AI_UID_NAMESPACE, name)}"
