"""The package as a wheel carries what it reads, and imports on any OS. (.ci/run builds the wheel, installs it in a
fresh venv outside the checkout and runs the README's main command from there; these are the fast checks.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import engine
from engine.bench.scenario import scenarios_dir
from engine.paths import configs_dir

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(engine.__file__).resolve().parent
POSIX_ONLY = {"fcntl", "termios", "tty", "pty", "pwd", "grp", "resource", "posix", "syslog", "crypt"}


def test_shipped_data_lives_inside_the_package() -> None:
    assert configs_dir().resolve().is_relative_to(PACKAGE)
    assert scenarios_dir().resolve().is_relative_to(PACKAGE)
    assert (configs_dir() / "models.yaml").is_file() and list(scenarios_dir().glob("*.yaml"))


def test_package_data_globs_cover_every_shipped_file() -> None:
    tomllib = pytest.importorskip("tomllib")
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    covered = {p.resolve() for pkg, globs in package_data.items()
               for base in [ROOT.joinpath(*pkg.split("."))] for g in globs for p in base.glob(g) if p.is_file()}
    shipped = {p.resolve() for d in (configs_dir(), scenarios_dir()) for p in d.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert shipped and not shipped - covered, sorted(str(p) for p in shipped - covered)


def test_no_module_imports_a_posix_only_module_at_import_time() -> None:
    """`import engine` (and any submodule) must work on Windows: no top-level import of fcntl & co."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(PACKAGE)}: {n}" for n in names if n.split(".")[0] in POSIX_ONLY]
    assert not offenders
