"""Reading one TOML table: typed getters that remember which keys were used, and the checks
of single values (AE titles, networks, SOP classes, host names) whose failures become one line
naming the key (:class:`ConfigError`).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pacs_ai.config.defaults import AUTO
from pacs_ai.dicom_constants import SOP_CLASS_KEYWORDS
from pacs_ai.errors import UserError


class ConfigError(UserError):
    """The config file cannot be used; the message names the key and the fix."""


class Table:
    """One TOML table being read: typed getters that remember which keys were used."""

    def __init__(self, data: Any, name: str):
        if not isinstance(data, dict):
            raise ConfigError(f"{name} must be a table, e.g. {name} on its own line "
                              f"followed by key = value lines, got {describe(data)}")
        self.data = data
        self.name = name
        self.known: list[str] = []

    def _key(self, key: str) -> str:
        return f"{self.name} {key}"

    def _raw(self, key: str) -> tuple[bool, Any]:
        self.known.append(key)
        return (key in self.data, self.data.get(key))

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self._key(key)}: {problem}")

    def string(self, key: str, default: str, *, choices: tuple[str, ...] = (),
               check: Callable[[str], str | None] | None = None) -> str:
        present, value = self._raw(key)
        if not present:
            return default
        if not isinstance(value, str):
            raise self.fail(key, f"expected a quoted string, got {describe(value)}; "
                                 f'write {key} = "..."')
        if choices and value.lower() not in choices:
            raise self.fail(key, f"{value!r} is not one of {', '.join(map(repr, choices))}")
        if check is not None and (problem := check(value)) is not None:
            raise self.fail(key, problem)
        return value.lower() if choices else value

    def optional_string(self, key: str, *,
                        check: Callable[[str], str | None] | None = None) -> str | None:
        """A non-empty string (stripped), or None when the key is absent."""
        present, _ = self._raw(key)
        if not present:
            return None
        value = self.string(key, "", check=check).strip()
        if not value:
            raise self.fail(key, "is empty; give a value or remove the key")
        return value

    def integer(self, key: str, default: int, *, minimum: int | None = None,
                maximum: int | None = None) -> int:
        present, value = self._raw(key)
        if not present:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected a whole number without quotes, got {describe(value)}")
        _check_range(self, key, value, minimum, maximum)
        return value

    def integer_or_auto(self, key: str, *, minimum: int, maximum: int) -> int | str:
        """A whole number, or "auto" (the default) for the service to derive."""
        present, value = self._raw(key)
        if not present or (isinstance(value, str) and value.strip().lower() == AUTO):
            return AUTO
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f'expected "auto" or a whole number without quotes, got '
                                 f"{describe(value)}")
        _check_range(self, key, value, minimum, maximum)
        return value

    def number(self, key: str, default: float, *, minimum: float | None = None,
               maximum: float | None = None, exclusive_minimum: bool = False) -> float:
        present, value = self._raw(key)
        if not present:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, f"expected a number without quotes, got {describe(value)}")
        if exclusive_minimum and minimum is not None and value <= minimum:
            raise self.fail(key, f"must be greater than {minimum}, got {value}")
        _check_range(self, key, value, minimum, maximum)
        return float(value)

    def optional_number(self, key: str, *, minimum: float, maximum: float) -> float | None:
        """A number in [minimum, maximum], or None when the key is absent."""
        present, _ = self._raw(key)
        return self.number(key, math.nan, minimum=minimum, maximum=maximum) if present else None

    def number_range(self, key: str, default: tuple[float, float], *, minimum: float,
                     maximum: float, example: str) -> tuple[float, float]:
        """[low, high]: two numbers with minimum <= low <= high <= maximum."""
        present, value = self._raw(key)
        if not present:
            return default
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v) for v in value)):
            raise self.fail(key, f"expected [low, high], two numbers without quotes such as "
                                 f"{example}, got {describe(value)}")
        low, high = float(value[0]), float(value[1])
        if not minimum <= low <= high <= maximum:
            raise self.fail(key, f"[{low:g}, {high:g}]: expected {minimum:g} <= low <= high <= "
                                 f"{maximum:g}")
        return low, high

    def boolean(self, key: str, default: bool) -> bool:
        present, value = self._raw(key)
        if not present:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false (no quotes), got {describe(value)}")
        return value

    def strings(self, key: str, default: tuple[str, ...],
                check: Callable[[str], str | None] | None = None) -> tuple[str, ...]:
        present, value = self._raw(key)
        if not present:
            return default
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.fail(key, f'expected a list of quoted strings like ["A", "B"], '
                                 f"got {describe(value)}")
        if check is not None:
            for item in value:
                if (problem := check(item)) is not None:
                    raise self.fail(key, f"{item!r}: {problem}")
        return tuple(value)

    def path(self, key: str, default: Path | None, base_dir: Path, *,
             must_exist: bool = False) -> Path | None:
        present, value = self._raw(key)
        if not present:
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f'expected a file path as a quoted string, got {describe(value)}')
        resolved = (base_dir / Path(value).expanduser()).resolve()
        if must_exist and not resolved.is_file():
            raise self.fail(key, f"file not found: {resolved}; fix the path or remove the key")
        return resolved

    def finish(self) -> None:
        unknown = sorted(set(self.data) - set(self.known))
        if unknown:
            raise unknown_key(self.name, unknown[0], self.known)

    def check_keys(self, accepted: Iterable[str], listed: Iterable[str]) -> None:
        """Refuse a key outside `accepted` before any other check, so a misspelt key is named
        as such, not as the required key it was meant to be; the message lists `listed`."""
        unknown = sorted(set(self.data) - set(accepted))
        if unknown:
            raise unknown_key(self.name, unknown[0], listed)


def unknown_key(where: str, key: str, known: Iterable[str]) -> ConfigError:
    """The error for a key `where` does not take, with the closest known key if one is close
    (`ae_tile`: did you mean 'ae_title'?)."""
    known = list(dict.fromkeys(known))
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}; the keys of {where} are: "
                       f"{', '.join(known)} (see deploy/pacs-ai.toml)")


def _check_range(table: Table, key: str, value: float, minimum: float | None,
                 maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise table.fail(key, f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise table.fail(key, f"must be at most {maximum}, got {value}")


def describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "a whole number", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def check_ae_title(value: str) -> str | None:
    """DICOM AE titles: 1 to 16 printable ASCII characters, no backslash, not only spaces."""
    if not value.strip():
        return "an AE title must not be empty"
    if len(value) > 16:
        return f"an AE title has at most 16 characters, this one has {len(value)}"
    if not all(32 <= ord(ch) < 127 for ch in value) or "\\" in value:
        return "an AE title may hold only printable ASCII characters and no backslash"
    return None


def check_network(value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return 'not an IP address or network, e.g. "10.1.2.3" or "10.1.0.0/16"'
    return None


def check_sop_class(value: str) -> str | None:
    if value in SOP_CLASS_KEYWORDS or _is_dotted_uid(value):
        return None
    return (f"not a SOP class UID or one of {', '.join(SOP_CLASS_KEYWORDS)}")


def _is_dotted_uid(value: str) -> bool:
    parts = value.split(".")
    return 0 < len(value) <= 64 and all(p.isdigit() and (p == "0" or not p.startswith("0"))
                                        for p in parts)


def check_host(value: str) -> str | None:
    if not value.strip() or any(ch.isspace() for ch in value):
        return "expected a host name or IP address without spaces"
    return None
