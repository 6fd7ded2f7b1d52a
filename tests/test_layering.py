"""The package's layering holds: the Caffe engine apart from the detection application.

The rules live as import-linter contracts in ``pyproject.toml`` (``lint-imports`` checks them
too); this test runs them and checks that their module lists name every top-level module, so a
new module cannot slip past them. Import-linter sees every import statement, function-local ones
included; the engine's sources are also searched for application module names in strings
(``importlib.import_module("readonly_ohem.ohem.layer")`` would hide from an import graph).
"""

from __future__ import annotations

import pkgutil
import re
import tomllib
from pathlib import Path

import pytest

import readonly_ohem

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(readonly_ohem.__file__).resolve().parent
PYPROJECT = REPO / "pyproject.toml"
ENGINE = ("caffe", "ops")
LEAVES = ("errors", "atomic")  # import nothing of the package; anyone may use them


def top_level_modules() -> set[str]:
    return {m.name for m in pkgutil.iter_modules([str(PACKAGE)])} - {"__main__"}


def contracts() -> dict[str, dict]:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    return {c["name"]: c for c in config["contracts"]}


def short(names) -> set[str]:
    return {n.removeprefix("readonly_ohem.") for n in names}


pytestmark = pytest.mark.skipif(not PYPROJECT.is_file(), reason="needs the source tree")


def test_the_import_contracts_hold():
    cli = pytest.importorskip("importlinter.cli", reason="pip install '.[test]' (import-linter)")
    assert cli.lint_imports(config_filename=str(PYPROJECT), no_cache=True) == 0, \
        "an import breaks the layering: run `lint-imports` for the chain"


def test_the_contracts_name_every_module():
    every = top_level_modules()
    assert set(ENGINE) | set(LEAVES) <= every
    by_source = {frozenset(short(c["source_modules"])): c for c in contracts().values()}
    engine = by_source[frozenset(ENGINE)]
    assert short(engine["forbidden_modules"]) == every - set(ENGINE) - set(LEAVES)
    datasets = by_source[frozenset({"datasets"})]
    assert short(datasets["forbidden_modules"]) == every - {"datasets", "config", "ops",
                                                             "progress", *LEAVES}
    commands = next(c for c in contracts().values()
                    if short(c["forbidden_modules"]) == {"commands", "cli"})
    assert short(commands["source_modules"]) == every - {"commands", "cli"}


def test_the_engine_names_no_application_module_even_in_strings():
    allowed = set(ENGINE) | set(LEAVES)
    found = []
    for folder in ENGINE:
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            text = path.read_text()
            for m in re.finditer(r"readonly_ohem\.(\w+)|from readonly_ohem import (\w+)", text):
                name = m.group(1) or m.group(2)
                if name not in allowed:
                    line = text.count("\n", 0, m.start()) + 1
                    found.append(f"{path.relative_to(PACKAGE)}:{line}: {m.group(0)}")
    assert not found, "the engine names application modules:\n" + "\n".join(found)
