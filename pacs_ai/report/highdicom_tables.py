"""highdicom's table of module attributes, parsed one module at a time.

highdicom answers "which attributes does DICOM module X hold" (to copy the Patient and Study
modules into a report, and to ask whether an IOD has Content Date) from one JSON file that covers
the whole standard: 16.5 MB of text, about 60 MiB of Python objects and 80 MB of RSS once
parsed, loaded in full the first time any SR is built. A report on a CR or DX image needs
about 40 of its 436 modules. `use_lazy_module_table()` swaps highdicom's cached loader for a
mapping that parses a module's entry the first time it is asked for, so each process that builds
reports keeps the text (16.5 MB) and the few modules it used instead of the whole table
(docs/benchmarks.md). The answers are the same: tests/test_report.py builds reports both ways and
compares the bytes.
"""

from __future__ import annotations

import json
import pkgutil
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import highdicom
import highdicom._standard_utils as standard_utils

TABLE_RESOURCE = "_standard/module_attribute_map.json"
LOADER_NAME = "get_module_attribute_map"
_TOP_LEVEL_KEY = re.compile(r'\n  "([^"\n]+)": \[')  # the file's top-level keys, two-space indent


class LazyModuleTable(Mapping[str, list[dict[str, Any]]]):
    """Module key -> attribute list, each list parsed from highdicom's JSON when first read."""

    def __init__(self, text: str):
        self._text = text
        self._value_starts = {match.group(1): match.end() - 1
                              for match in _TOP_LEVEL_KEY.finditer(text)}
        self._parsed: dict[str, list[dict[str, Any]]] = {}
        self._decoder = json.JSONDecoder()
        if not self._value_starts:
            raise ValueError("highdicom's module table has an unexpected layout")

    def __getitem__(self, key: str) -> list[dict[str, Any]]:
        if key not in self._parsed:
            start = self._value_starts[key]  # KeyError for an unknown module, as with a dict
            self._parsed[key] = self._decoder.raw_decode(self._text, start)[0]
        return self._parsed[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._value_starts)

    def __len__(self) -> int:
        return len(self._value_starts)

    @property
    def parsed_modules(self) -> int:
        return len(self._parsed)


_original_loader = standard_utils.get_module_attribute_map
_lazy_table: LazyModuleTable | None = None


def lazy_module_table() -> LazyModuleTable:
    global _lazy_table
    if _lazy_table is None:
        data = pkgutil.get_data("highdicom", TABLE_RESOURCE)
        if data is None:
            raise FileNotFoundError(f"highdicom {highdicom.__version__} has no {TABLE_RESOURCE}")
        _lazy_table = LazyModuleTable(data.decode("utf-8"))
    return _lazy_table


def use_lazy_module_table() -> None:
    """Point every highdicom module that imported the loader at the lazy table."""
    _set_loader(lazy_module_table)


def use_full_module_table() -> None:
    """highdicom's own loader again (tests compare both)."""
    _set_loader(_original_loader)


def _set_loader(loader: Any) -> None:
    current = {_original_loader, lazy_module_table}
    for name, module in list(sys.modules.items()):
        if name.startswith("highdicom") and getattr(module, LOADER_NAME, None) in current:
            setattr(module, LOADER_NAME, loader)
