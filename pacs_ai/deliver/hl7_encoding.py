"""An HL7 message as the bytes a RIS reads, in the character set its MSH-18 states (the
destination's `charset`: UTF-8, ISO 8859-1 or ASCII), and a RIS's answer bytes as text.

A value the character set cannot represent (a Cyrillic or CJK name to an 8859/1 RIS) is never
replaced or garbled, which would file the result under a name that looks like no patient's: the
message is not sent, and the reason names the fields, never their values (patient data stays
out of the log, the queue and the audit trail).
"""

from __future__ import annotations

from pacs_ai.config import HL7_CHARSETS, fits_charset

# MSH-18 (HL7 table 0211) -> the Python codec; v2.5.1: an empty MSH-18 means ASCII
CODECS = {msh_18: codec for msh_18, codec in HL7_CHARSETS.values()} | {"": "ascii"}
# What the fields pacs-ai fills with a film's, a model's or the config's values hold, for the
# reason a message could not be sent (the OBX-5 values are named by their OBX-3)
FIELD_NAMES = {
    "MSH-4": "sending facility", "MSH-5": "receiving application",
    "MSH-6": "receiving facility", "SFT-1": "software vendor", "SFT-2": "software version",
    "SFT-3": "software product", "SFT-4": "software binary ID", "PID-3": "patient ID",
    "PID-5": "patient name", "ORC-3": "accession number", "OBR-3": "accession number",
    "OBR-4": "procedure", "OBR-18": "accession number",
}


class NotEncodable(ValueError):
    """The message has values its character set cannot represent; str() is the
    "hl7-encoding: ..." reason, naming the fields (not their values)."""


def encode_er7(text: str) -> bytes:
    """`text`, an ER7 message (segments separated by CR), in the character set its MSH-18
    names; NotEncodable when a value does not fit it."""
    msh_18 = _msh_field(text, 18)
    codec = CODECS[msh_18]  # pacs-ai only ever writes the ones it has (KeyError: a bug)
    try:
        return text.encode(codec)
    except UnicodeEncodeError:
        pass
    fields = unencodable_fields(text, codec)
    verb = "has" if len(fields) == 1 else "have"
    raise NotEncodable(f"hl7-encoding: {', '.join(fields)} {verb} characters outside "
                       f"{msh_18 or 'ASCII'}, the destination's charset: not sent, as the RIS "
                       "would show them garbled")


def unencodable_fields(text: str, codec: str) -> list[str]:
    """The fields of an ER7 message with characters `codec` cannot encode, as "PID-5 (patient
    name)", in message order, each once."""
    found: list[str] = []
    for segment in text.split("\r"):
        parts = segment.split("|")
        name = parts[0]
        for index, value in enumerate(parts[1:], start=1):
            if fits_charset(value, codec):
                continue
            number = index + 1 if name == "MSH" else index  # MSH-1 is the "|" itself
            found.append(_field_label(name, number, parts))
    return list(dict.fromkeys(found))


def decode_answer(raw: bytes, charset: str) -> str:
    """A RIS's answer in the destination's `charset` (a HL7_CHARSETS key). A RIS answering in
    another (bytes not valid in it) is read as UTF-8, else Latin-1, which takes any byte: its
    code and control ID are ASCII either way, and its text must still match the patient's
    identifiers to be cleared of them (report_facts.redact)."""
    for codec in dict.fromkeys((HL7_CHARSETS[charset][1], "utf-8", "iso-8859-1")):
        try:
            return raw.decode(codec)
        except UnicodeDecodeError:
            continue
    raise AssertionError("ISO 8859-1 decodes any byte")


def _field_label(segment: str, number: int, parts: list[str]) -> str:
    key = f"{segment}-{number}"
    what = FIELD_NAMES.get(key)
    if segment == "OBX" and number == 5 and len(parts) > 3:
        what = parts[3].split("^")[1] if "^" in parts[3] else None  # OBX-3's text
    return f"{key} ({what})" if what else key


def _msh_field(text: str, number: int) -> str:
    parts = text.split("\r", 1)[0].split("|")
    return parts[number - 1] if len(parts) >= number else ""
