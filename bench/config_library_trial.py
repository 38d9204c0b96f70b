"""Issue 25 item 4: pacs_ai.config (hand-written readers) against the same schema in pydantic 2
(bench/config_pydantic_trial.py), on the config error cases the tests assert, with lines of code,
import time and what the library costs. The figures behind docs/architecture.md "Why the config
is validated by hand".

pydantic 2 cannot go into the project's venv (the FHIR test peer's fhir.resources 6.4.0, the last
FHIR R4 release, is built on pydantic 1), so it is installed apart and put on the path here:

    .venv/bin/pip install --target runs/pydantic2 "pydantic>=2,<3"
    .venv/bin/python bench/config_library_trial.py --pydantic runs/pydantic2 [--all] [--runs 15]

The error cases are read from the tests themselves (their @pytest.mark.parametrize lists, by
`ast`, so a case added there is run here too) plus the few written inline in tests, listed below.
A case is kept when the message passes the test's own assertion and is one line.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import io
import re
import statistics
import subprocess
import sys
import tempfile
import tokenize
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
TRIAL = REPO / "bench" / "config_pydantic_trial.py"


# --- the cases ---------------------------------------------------------------------------------
# How a test feeds its input: a TOML file through load_config, or a dict through parse_config.

@dataclasses.dataclass(frozen=True)
class Case:
    test: str  # file::function
    feed: str  # "file" (TOML text) or "data" (a dict)
    given: Any
    check: Callable[[str, Path], bool]  # the test's assertion on the message (and file path)
    files: tuple[str, ...] = ()  # files the test writes into its tmp_path first


def after_path_startswith(words: str) -> Callable[[str, Path], bool]:
    return lambda message, path: message.split(": ", 1)[-1].startswith(words)


def contains(*parts: str, with_path: bool = False) -> Callable[[str, Path], bool]:
    return lambda message, path: (all(part in message for part in parts)
                                  and (not with_path or str(path) in message))


def startswith(words: str) -> Callable[[str, Path], bool]:
    return lambda message, path: message.startswith(words)


def search(pattern: str) -> Callable[[str, Path], bool]:  # pytest.raises(match=...)
    return lambda message, path: re.search(pattern, message) is not None


TWO_DESTINATIONS = "TWO_DESTINATIONS"  # test_destinations_config's, read from the file
# test file, function -> (feed, build the input from the parameters, the test's assertion)
PARAMETRIZED: dict[tuple[str, str], tuple[str, Callable[..., Any], Callable[..., Any]]] = {
    ("test_config.py", "test_an_unknown_key_is_named_first_with_the_key_it_is_close_to"):
        ("file", lambda text, first_words: text, lambda text, first_words:
         after_path_startswith(first_words)),
    ("test_config.py", "test_bad_config_names_the_key"):
        ("file", lambda text, named: text, lambda text, named: contains(named, with_path=True)),
    ("test_config.py", "test_bad_calling_ae_address_bindings_name_the_key"):
        ("file", lambda entries, says: f"[listener]\nallowed_calling_ae_titles = {entries}\n",
         lambda entries, says: contains("[listener] allowed_calling_ae_titles", says)),
    ("test_destinations_config.py", "test_dicomweb_mistakes_name_the_key"):
        ("data", lambda entry, message: {"destinations": [entry]},
         lambda entry, message: startswith(message)),
    ("test_destinations_config.py", "test_routing_mistakes_name_the_key"):
        ("data", lambda routes, routing, message: {
            "destinations": TWO_DESTINATIONS, "routes": routes,
            **({"routing": routing} if routing is not None else {})},
         lambda routes, routing, message: startswith(message)),
    ("test_fhir.py", "test_fhir_mistakes_name_the_key"):
        ("data", lambda entry, message: {"destinations": [entry]},
         lambda entry, message: startswith(message)),
    ("test_hl7.py", "test_hl7_mistakes_name_the_key"):
        ("data", lambda data, message: data, lambda data, message: startswith(message)),
    ("test_intended_use.py", "test_bad_model_overrides_name_the_key"):
        ("file", lambda text, named: text, lambda text, named: contains(named, with_path=True)),
    ("test_shadow.py", "test_bad_shadow_tables_name_the_key"):
        ("file", lambda text, message: text, lambda text, message: contains(message)),
    ("test_site_threshold.py", "test_inconsistent_binding_keys_stop_with_the_key_named"):
        ("file", lambda text, message: "[model]\n" + text,
         lambda text, message: contains(message)),
    ("test_capacity.py", "test_a_bad_count_names_the_key_and_auto"):
        ("file", lambda value: f"[workers]\ncount = {value}\n",
         lambda value: contains("[workers] count")),
}

DIMSE = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}
# Cases the tests write inline (not parametrized), as they write them.
INLINE = [
    Case("test_audit.py::test_audit_config_defaults_and_errors", "data",
         {"audit": {"max_bytes": 1000}}, search(r"\[audit\].*max_bytes")),
    Case("test_audit.py::test_audit_config_defaults_and_errors", "data",
         {"audit": {"backup_count": 0}}, search(r"\[audit\].*backup_count")),
    Case("test_audit.py::test_audit_config_defaults_and_errors", "data",
         {"audit": {"include_patient_id": "yes"}}, search(r"\[audit\].*include_patient_id")),
    Case("test_audit.py::test_audit_config_defaults_and_errors", "data",
         {"audit": {"rotate": True}}, search(r"\[audit\].*rotate")),
    Case("test_heatmap.py::test_report_heatmap_settings_default_on_for_pneumonia_only_and_are_"
         "checked", "data", {"report": {"heatmap": "yes"}}, search("heatmap")),
    Case("test_heatmap.py::test_report_heatmap_settings_default_on_for_pneumonia_only_and_are_"
         "checked", "data", {"report": {"heatmap_for_normal": 1}}, search("heatmap_for_normal")),
    Case("test_web.py::test_web_config_keys", "data", {"web": {"token_file": "missing"}},
         search(r"^\[web\] token_file: file not found")),
    Case("test_web.py::test_web_config_keys", "data", {"web": {"token": "x"}},
         search(r"^\[web\]: unknown key 'token'")),
    Case("test_destination_echo.py::test_echo_interval_config", "data",
         {"destinations": [{**DIMSE, "echo_interval_seconds": 2}]},
         search(r"echo_interval_seconds: must be 0 .* at least 10")),
    Case("test_destination_echo.py::test_echo_interval_config", "data",
         {"destinations": [{"kind": "dicomweb", "url": "http://pacs/dicom-web",
                            "echo_interval_seconds": 60}]}, search("echo_interval_seconds")),
    Case("test_config.py::test_tls_files_are_checked", "file",
         '[tls]\ncert_file = "cert.pem"\nkey_file = "key.pem"\nrequire_client_cert = true\n',
         search("require_client_cert"), files=("cert.pem", "key.pem")),
    Case("test_config.py::test_a_config_file_takes_any_caller_only_when_it_says_so", "file",
         '[listener]\naccept_any_calling_ae = true\nallowed_calling_ae_titles = ["CR1"]\n',
         contains("[listener] accept_any_calling_ae", "allowed_calling_ae_titles")),
    Case("test_config.py::test_missing_config_file_is_a_user_error", "missing", None,
         search("config file not found")),
]


def _module_constants(tree: ast.Module, filename: str) -> dict[str, Any]:
    names: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            try:
                names[node.targets[0].id] = eval(compile(ast.Expression(node.value), filename,
                                                         "eval"), {}, dict(names))
            except Exception:  # a call or an import's name: not a constant the cases use
                pass
    return names


def parametrized_cases() -> list[Case]:
    """Every parametrized config error case of the tests above, read from the test files."""
    cases = []
    for (filename, function), (feed, build, check) in PARAMETRIZED.items():
        path = TESTS / filename
        tree = ast.parse(path.read_text(), str(path))
        constants = _module_constants(tree, str(path))
        [node] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
        [mark] = [d for d in node.decorator_list if isinstance(d, ast.Call)
                  and ast.unparse(d.func) == "pytest.mark.parametrize"]
        values = eval(compile(ast.Expression(mark.args[1]), str(path), "eval"), {}, constants)
        for params in values:
            params = params if isinstance(params, tuple) else (params,)
            given = build(*params)
            if isinstance(given, dict) and given.get("destinations") == TWO_DESTINATIONS:
                given = {**given, "destinations": constants["TWO_DESTINATIONS"]}
            cases.append(Case(f"{filename}::{function}", feed, given, check(*params),
                              files=("password",) if "dicomweb" in function else ()))
    return cases


def message_of(module: Any, case: Case, folder: Path) -> str | None:
    """The ConfigError message `module` gives for the case (None: it raised none)."""
    for name in case.files:
        (folder / name).write_text("x\n")
    path = folder / "pacs-ai.toml"
    try:
        if case.feed == "file":
            path.write_text(case.given)
            module.load_config(path)
        elif case.feed == "missing":
            module.load_config(folder / "nope.toml")
        else:
            module.parse_config(case.given, base_dir=folder)
    except module.ConfigError as error:
        return str(error)
    return None


# --- the other figures -------------------------------------------------------------------------

def code_lines(paths: list[Path]) -> tuple[int, list[str]]:
    """All lines, and the code lines (no blank, comment-only or docstring lines), stripped."""
    total, code = 0, []
    for path in paths:
        lines, lines_of_code = _code_lines(path.read_text())
        total, code = total + lines, code + lines_of_code
    return total, code


def _code_lines(text: str) -> tuple[int, list[str]]:
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) \
                and isinstance(node.body[0].value, ast.Constant) \
                and isinstance(node.body[0].value.value, str):
            docstrings.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    code: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}
    for token in tokenize.tokenize(io.BytesIO(text.encode()).readline):
        if token.type not in skip:
            code.update(n for n in range(token.start[0], token.end[0] + 1) if n not in docstrings)
    lines = text.splitlines()
    return len(lines), [lines[n - 1].strip() for n in sorted(code)]


def import_seconds(statements: dict[str, tuple[str, str]], runs: int) -> dict[str, float]:
    """Median wall time of each statement in a fresh interpreter (the import and what it needs),
    the statements interleaved run by run so a busy machine slows them alike."""
    times: dict[str, list[float]] = {what: [] for what in statements}
    for _ in range(runs):
        for what, (statement, pythonpath) in statements.items():
            program = (f"import time; t = time.perf_counter(); {statement}; "
                       "print(time.perf_counter() - t)")
            result = subprocess.run([sys.executable, "-c", program], capture_output=True,
                                    text=True, env={"PYTHONPATH": pythonpath, "PATH": "/usr/bin:/bin"},
                                    check=True)
            times[what].append(float(result.stdout))
    return {what: statistics.median(values) for what, values in times.items()}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pydantic", type=Path, required=True,
                        help="a folder with pydantic 2 in it (pip install --target)")
    parser.add_argument("--all", action="store_true", help="print every case, not only misses")
    parser.add_argument("--runs", type=int, default=15, help="fresh interpreters per import time")
    args = parser.parse_args()
    sys.path[:0] = [str(args.pydantic.resolve()), str(REPO / "bench"), str(REPO)]
    import pydantic

    assert pydantic.VERSION.startswith("2."), f"pydantic {pydantic.VERSION} on the path, not 2"
    import config_pydantic_trial as trial

    from pacs_ai import config as hand

    cases = parametrized_cases() + INLINE
    rows, tally = [], {"hand": 0, "pydantic": 0, "same": 0}
    for case in cases:
        kept, texts = {}, {}
        for name, module in (("hand", hand), ("pydantic", trial)):
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                text = message_of(module, case, folder)
                texts[name] = None if text is None else text.replace(str(folder), "TMP")
                kept[name] = (text is not None and "\n" not in text
                              and case.check(text, folder / "pacs-ai.toml"))
                tally[name] += kept[name]
        same = texts["hand"] == texts["pydantic"]
        tally["same"] += same
        rows.append((case, kept, same, texts))

    print(f"pydantic {pydantic.VERSION}; {len(cases)} config error cases from "
          f"{len({c.test for c in cases})} tests")
    print("\n| test | case | hand-written | pydantic 2 | same words |\n|---|---|---|---|---|")
    for case, kept, same, texts in rows:
        if args.all or not (kept["hand"] and kept["pydantic"] and same):
            given = case.given if isinstance(case.given, str) else repr(case.given)
            given = given.strip().replace("\n", " / ")
            print(f"| {case.test.split('::')[1][:40]} | `{given[:60]}` | "
                  f"{'kept' if kept['hand'] else 'LOST'} | "
                  f"{'kept' if kept['pydantic'] else 'LOST'} | {'yes' if same else 'no'} |")
    print(f"\nkept as the tests assert, one line: hand-written {tally['hand']}/{len(cases)}, "
          f"pydantic 2 {tally['pydantic']}/{len(cases)}; the same words: "
          f"{tally['same']}/{len(cases)}")
    misses = [(c, t) for c, k, s, t in rows if not k["pydantic"]]
    for case, texts in misses:
        print(f"  pydantic misses {case.test}: {case.given!r}\n    hand:     {texts['hand']}"
              f"\n    pydantic: {texts['pydantic']}")

    # the same Config from the shipped example and from an empty file
    example = tomllib.loads((REPO / "deploy" / "pacs-ai.toml").read_text())
    example.get("model", {}).pop("path", None)
    example.get("tls", {}).clear()
    for destination in example.get("destinations", []):
        destination.pop("tls", None)
    with tempfile.TemporaryDirectory() as tmp:
        equal = all(dataclasses.asdict(hand.parse_config(data, base_dir=Path(tmp)))
                    == dataclasses.asdict(trial.parse_config(data, base_dir=Path(tmp)))
                    for data in ({}, example))
    print(f"\nthe same Config from deploy/pacs-ai.toml and from an empty file: {equal}")

    print("\n| module | lines | code lines | code lines only in it |\n|---|---|---|---|")
    # pacs_ai.config as it is now: one module, or a package of them
    hand_file = Path(hand.__file__)
    hand_files = (sorted(hand_file.parent.rglob("*.py")) if hand_file.name == "__init__.py"
                  else [hand_file])
    (hand_all, hand_code), (trial_all, trial_code) = code_lines(hand_files), code_lines([TRIAL])
    matcher = difflib.SequenceMatcher(None, hand_code, trial_code, autojunk=False)
    shared = sum(block.size for block in matcher.get_matching_blocks())
    for name, total, code in (("pacs_ai.config", hand_all, hand_code),
                              ("bench/config_pydantic_trial.py", trial_all, trial_code)):
        print(f"| {name} | {total} | {len(code)} | {len(code) - shared} |")

    root = str(REPO)
    with_pydantic = f"{args.pydantic.resolve()}:{REPO / 'bench'}:{root}"
    parse = ("; from pathlib import Path; m.parse_config({'listener': {'port': 4242}}, "
             "base_dir=Path('.'))")
    figures = import_seconds({
        "import pacs_ai.config": ("import pacs_ai.config", root),
        "import the pydantic trial": ("import config_pydantic_trial", with_pydantic),
        "import pacs_ai.config, parse once": ("import pacs_ai.config as m" + parse, root),
        "import the trial, parse once": ("import config_pydantic_trial as m" + parse,
                                         with_pydantic),
        "import pydantic alone": ("import pydantic", with_pydantic),
    }, args.runs)
    print(f"\n| fresh interpreter, median of {args.runs} | ms |\n|---|---|")
    for what, seconds in figures.items():
        print(f"| {what} | {seconds * 1000:.1f} |")

    installed = {name: folder_bytes(args.pydantic / name) for name in
                 ("pydantic", "pydantic_core", "annotated_types", "typing_inspection")
                 if (args.pydantic / name).is_dir()}
    print(f"\npydantic 2 installed: {sum(installed.values()) / 1e6:.1f} MB ("
          + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in installed.items()) + ")")
    venv = subprocess.run(  # the venv's own packages, without the folder above on the path
        [sys.executable, "-c", "from importlib.metadata import version as v; "
         "print(v('fhir.resources'), v('pydantic'))"], capture_output=True, text=True)
    if venv.returncode == 0:
        fhir, venv_pydantic = venv.stdout.split()
        print(f"this venv: fhir.resources {fhir} (FHIR R4 4.0.1, the test peer) on pydantic "
              f"{venv_pydantic}; it fails to import under pydantic 2, and fhir.resources 7 and "
              "later (pydantic 2) carry R5, R4B and STU3, not R4")

if __name__ == "__main__":
    main()
