"""What ``pip install .`` installs: one top-level package, ``deepflow``, holding every package
folder of the tree (``flows/``, ``workers/``, ``migrations/`` as ``deepflow.flows`` and so on),
with the data files the code reads and the entry points plugins rely on."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINKED = {
    "flows": "deepflow/flows",
    "workers": "deepflow/workers",
    "migrations": "deepflow/migrations",
}

SKIP = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "node_modules")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[zipfile.ZipFile, str]:
    out = tmp_path_factory.mktemp("wheel")
    # A clean copy: setuptools keeps build/ between in-tree builds, and a stale file there
    # would hide a package missing from pyproject.toml.
    tree = tmp_path_factory.mktemp("tree") / "deepflow"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(*SKIP))
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (path,) = out.glob("deepflow-*.whl")
    return zipfile.ZipFile(path), built.stdout + built.stderr


def _package_folders() -> set[str]:
    """Where each package folder of the tree lands in the wheel."""
    found = {
        init.parent.relative_to(REPO / "platform").as_posix()
        for init in (REPO / "platform" / "deepflow").rglob("__init__.py")
    }
    for top, installed in LINKED.items():
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / top)
            found.add(installed if rel == Path(".") else f"{installed}/{rel.as_posix()}")
    return found


def test_top_level_folders_are_linked_into_the_package() -> None:
    """The product's top-level folders are the package's subpackages, not copies."""
    for top in LINKED:
        link = REPO / "platform" / "deepflow" / top
        assert link.is_symlink() and link.resolve() == (REPO / top).resolve(), link


def test_one_top_level_package(wheel: tuple[zipfile.ZipFile, str]) -> None:
    wheel, _ = wheel
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"deepflow"}


def test_every_package_folder_is_listed(wheel: tuple[zipfile.ZipFile, str]) -> None:
    """Installed as a package, not as data: setuptools copies an unlisted folder anyway but
    warns that it is "absent from the `packages` configuration"."""
    wheel, log = wheel
    installed = {name.rsplit("/", 1)[0] for name in wheel.namelist() if name.endswith(".py")}
    assert not _package_folders() - installed
    assert "absent from the `packages` configuration" not in log, log


def test_data_files_and_entry_points(wheel: tuple[zipfile.ZipFile, str]) -> None:
    wheel, _ = wheel
    names = set(wheel.namelist())
    assert {"deepflow/migrations/script.py.mako", "deepflow/migrations/NOTES.md"} <= names
    assert any(n.startswith("deepflow/engine/data/") and n.endswith(".txt") for n in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "[deepflow.operators]" in text and "deepflow = deepflow.cli:main" in text
