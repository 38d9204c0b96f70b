"""Rewrite old pacs_ai module paths to the packages by stage (issue 25 item 1).

The modules that sat side by side in `pacs_ai/` moved into one package per pipeline stage
(docs/architecture.md, "Module map"). This script made that move and rewrote every import,
mock.patch string and path in the repository; a branch begun before the move can run it on the
files it added or changed, after `git rebase`, to rewrite their old paths too:

    python scripts/stage_packages.py rewrite FILE...     # rewrite old paths in place
    python scripts/stage_packages.py move                # the move itself (done once, on main)
    python scripts/stage_packages.py table               # old -> new, as the CHANGELOG lists

Running `rewrite` again on a rewritten file changes nothing, with one exception it cannot tell
apart: a bare `import pacs_ai.report` or `import pacs_ai.model` (the old modules, now the
packages) is read as the old module.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

# package -> (what the package is, its modules). Top-level modules that stay in pacs_ai/:
# cli, __main__, service (the one place that wires the stages together), config, errors,
# dicom_constants and finding (the vocabulary every stage shares).
PACKAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "network": ("DICOM networking both directions share: socket tuning, pynetdicom's "
                "internals behind one door, peer addresses",
                ("sockets", "pynetdicom_internals", "addresses")),
    "receive": ("the C-STORE listener: an association's films checked and acknowledged once "
                "they are durable in the spool and the queue",
                ("scp", "received", "inflation", "arrivals")),
    "queue": ("what is durable: the job queue (SQLite), the spool's files, what is kept of "
              "them and for how long, the destinations' latest C-ECHO",
              ("jobs", "spool", "retention", "echo_results")),
    "model": ("the model-file contract: loading and running the TorchScript model, the one "
              "preprocessing function it was trained with, its saliency grid, its intended "
              "use and a site's threshold bound to the file",
              ("model", "preprocessing", "heatmap", "intended_use", "site_threshold")),
    "film": ("a received file -> the model input: header filters, decode, display values",
             ("film_input", "filters", "pixels", "pixels_reduced")),
    "report": ("the DICOM SR (TID 1500) and the heat-map image made for a film, their UIDs, "
               "and reading a report back",
               ("report", "report_facts", "heatmap_image", "uids", "highdicom_tables")),
    "classify": ("the worker threads: claim a batch, prepare its films in helper processes, "
                 "assess them, write the reports and queue their deliveries; the shadow model",
                 ("worker", "helper_processes", "shadow", "capacity")),
    "deliver": ("each report to its destinations: routing, the sender threads, one transport "
                "per kind (C-STORE, STOW-RS, HL7 MLLP, FHIR), the periodic C-ECHO",
                ("sender", "routing", "transport", "cstore_transport", "stow_transport",
                 "http_client", "hl7_transport", "hl7_message", "mllp", "fhir_transport",
                 "fhir_report", "destination_echo")),
    "ops": ("what an admin reads: metrics, health, the HTTP server and queue page, the audit "
            "trail, logs, the drift watch",
            ("metrics", "audit", "logs", "health", "http_server", "web", "drift",
             "drift_chart")),
    "evaluate": ("offline: classify files, evaluate on labelled films, compare a shadow model "
                 "with the live one",
                 ("offline_classification", "evaluation", "evaluation_html", "site_evaluation",
                  "comparison", "comparison_html")),
}

PACKAGE_OF = {module: package for package, (_, modules) in PACKAGES.items()
              for module in modules}
MODULES_OF = {package: set(modules) for package, (_, modules) in PACKAGES.items()}
NAMES = "|".join(sorted(PACKAGE_OF, key=len, reverse=True))

# pacs_ai.<x>[.<y>]: a module path in code, strings (mock.patch) and prose
DOTTED = re.compile(r"(?<![\w.])pacs_ai\.(\w+)(?:\.(\w+))?")
# from pacs_ai.<x> import a, b as c   (one line; parenthesised lists are read to the ")")
FROM_MODULE = re.compile(r"\bfrom pacs_ai\.(\w+) import ")
# from pacs_ai import a, b as c   at the start of a line
FROM_PACKAGE_LINE = re.compile(r"^(?P<indent>[ \t]*)from pacs_ai import (?P<names>[\w ,]+?)"
                               r"(?P<tail>[ \t]*(#.*)?)$", re.M)
FROM_PACKAGE_ONE = re.compile(rf"\bfrom pacs_ai import ({NAMES})\b")
FILE_PATH = re.compile(rf"\bpacs_ai/({NAMES})\.py\b")
# tests: `source / "scp.py"` where source is pacs_ai's folder
JOINED_PATH = re.compile(rf"(\b[A-Za-z_]\w* / )\"({NAMES})\.py\"")


def _dotted(match: re.Match) -> str:
    first, second = match.group(1), match.group(2)
    if first in MODULES_OF and second is not None and second in MODULES_OF[first]:
        return match.group(0)  # already pacs_ai.<package>.<module>
    if first in MODULES_OF and second is None and \
            match.string.startswith(" import ", match.end()):
        return match.group(0)  # `from pacs_ai.<package> import`: _from_module settled it
    if first not in PACKAGE_OF:
        return match.group(0)
    moved = f"pacs_ai.{PACKAGE_OF[first]}.{first}"
    return moved + (f".{second}" if second is not None else "")


def _imported_names(text: str, start: int) -> list[str]:
    """The names a `from ... import` starting at `start` imports (without `as` parts)."""
    rest = text[start:]
    if rest.startswith("("):
        body = rest[1:rest.index(")")]
    else:
        body = rest.split("\n", 1)[0].split("#", 1)[0]
        body = body.split('\\n', 1)[0].split('"', 1)[0]
    return [part.split(" as ")[0].strip() for part in body.split(",") if part.strip()]


def _from_module(text: str) -> str:
    """`from pacs_ai.x import ...` -> `from pacs_ai.<package>.x import ...` for old modules."""
    out, last = [], 0
    for match in FROM_MODULE.finditer(text):
        first = match.group(1)
        names = _imported_names(text, match.end())
        already = first in MODULES_OF and names and all(n in MODULES_OF[first] for n in names)
        if first in PACKAGE_OF and not already:
            out.append(text[last:match.start()])
            out.append(f"from pacs_ai.{PACKAGE_OF[first]}.{first} import ")
            last = match.end()
    out.append(text[last:])
    return "".join(out)


def _from_package_line(match: re.Match) -> str:
    indent, tail = match.group("indent"), match.group("tail") or ""
    groups: dict[str, list[str]] = {}
    for part in (p.strip() for p in match.group("names").split(",")):
        name = part.split(" as ")[0].strip()
        groups.setdefault(PACKAGE_OF.get(name, ""), []).append(part)
    if list(groups) == [""]:
        return match.group(0)
    lines = [f"{indent}from pacs_ai{'.' + package if package else ''} import {', '.join(parts)}"
             for package, parts in groups.items()]
    lines[-1] += tail
    return "\n".join(lines)


def rewrite(text: str) -> str:
    text = FROM_PACKAGE_LINE.sub(_from_package_line, text)
    text = FROM_PACKAGE_ONE.sub(lambda m: f"from pacs_ai.{PACKAGE_OF[m.group(1)]} import "
                                          f"{m.group(1)}", text)
    text = _from_module(text)
    # what _from_module rewrote now reads pacs_ai.<package>.<module>, which _dotted leaves
    text = DOTTED.sub(_dotted, text)
    text = FILE_PATH.sub(lambda m: f"pacs_ai/{PACKAGE_OF[m.group(1)]}/{m.group(1)}.py", text)
    text = JOINED_PATH.sub(lambda m: f'{m.group(1)}"{PACKAGE_OF[m.group(2)]}" / '
                                     f'"{m.group(2)}.py"', text)
    return text


def rewrite_files(paths: list[Path]) -> list[Path]:
    changed = []
    for path in paths:
        try:
            text = path.read_text()
        except (UnicodeDecodeError, IsADirectoryError):
            continue
        new = rewrite(text)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


# What the move rewrites: the code and the docs of today. CHANGELOG.md is history, left as is.
REWRITTEN = ("pacs_ai", "training", "testbed", "tests", "bench", "scripts", "deploy", "docs",
             "README.md", "pyproject.toml", "sample_dicoms/README.md")
SUFFIXES = {".py", ".md", ".toml", ".sh", ".service", ".yml", ".yaml", ".cfg", ".txt", ""}


def tracked_files(root: Path) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--", *REWRITTEN], cwd=root, check=True,
                            capture_output=True, text=True).stdout.split()
    return [root / name for name in listed
            if Path(name).suffix in SUFFIXES and Path(name).name != Path(__file__).name]


def move(root: Path) -> None:
    for package, (summary, modules) in PACKAGES.items():
        folder = root / "pacs_ai" / package
        folder.mkdir(exist_ok=True)
        for module in modules:
            subprocess.run(["git", "mv", f"pacs_ai/{module}.py", f"pacs_ai/{package}/{module}.py"],
                           cwd=root, check=True)
        init = folder / "__init__.py"
        text = textwrap.fill(f'"""{summary[0].upper()}{summary[1:]}."""', width=96)
        init.write_text(text + "\n")
        subprocess.run(["git", "add", str(init)], cwd=root, check=True)
    changed = rewrite_files(tracked_files(root))
    print(f"moved {len(PACKAGE_OF)} modules into {len(PACKAGES)} packages; "
          f"rewrote {len(changed)} files")


def table() -> None:
    for package, (_, modules) in PACKAGES.items():
        for module in modules:
            print(f"| `pacs_ai.{module}` | `pacs_ai.{package}.{module}` |")


if __name__ == "__main__":
    command, *arguments = sys.argv[1:] or ["help"]
    if command == "rewrite" and arguments:
        for path in rewrite_files([Path(a) for a in arguments]):
            print(f"rewrote {path}")
    elif command == "move":
        move(Path(__file__).resolve().parent.parent)
    elif command == "table":
        table()
    else:
        sys.exit(__doc__)
