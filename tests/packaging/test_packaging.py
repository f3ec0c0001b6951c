"""What the build packages against what the source tree holds, so nothing can be left out again.

setup.py finds hmoe's packages and maps kernels/ and configs/ into it; these tests ask
setuptools' own build_py which files a wheel would hold, and compare them with every module and
shipped config in the tree. The sdist test checks that the C++/CUDA sources and headers travel
too, since a wheel built from the sdist compiles them. .ci/installed.sh then builds and installs
the real wheel and runs the CLI from outside the checkout.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Source folder -> the package it installs as.
TREES = {"hmoe": "hmoe", "kernels": "hmoe.kernels", "configs": "hmoe.configs"}


@pytest.fixture(scope="module")
def setup_module_vars():
    """setup.py's PACKAGES / PACKAGE_DIR / PACKAGE_DATA, without running setup()."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="hmoe_setup_under_test")


def _tree_files(suffixes: tuple[str, ...]) -> set[str]:
    """Every file with one of ``suffixes`` under the installed trees, relative to ROOT."""
    found = set()
    for folder in TREES:
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in suffixes and "__pycache__" not in path.parts:
                found.add(path.relative_to(ROOT).as_posix())
    return found


def _build_py_sources(variables) -> set[str]:
    """The source files setuptools' build_py copies into a wheel (modules and package data)."""
    from setuptools import Distribution

    cwd = os.getcwd()
    os.chdir(ROOT)  # package_dir entries are relative to the project root
    try:
        dist = Distribution({"name": "hmoe", "script_name": "setup.py",
                             "packages": variables["PACKAGES"],
                             "package_dir": variables["PACKAGE_DIR"],
                             "package_data": variables["PACKAGE_DATA"]})
        build_py = dist.get_command_obj("build_py")
        build_py.ensure_finalized()
        sources = {Path(p).as_posix() for p in build_py.get_source_files()}
        sources |= {Path(src_dir, name).as_posix()
                    for _, src_dir, _, names in build_py.data_files for name in names}
    finally:
        os.chdir(cwd)
    return sources


def test_every_package_folder_is_packaged(setup_module_vars):
    packages = set(setup_module_vars["PACKAGES"])
    for folder, package in TREES.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            name = ".".join((package, *relative))
            assert name in packages, f"{init.parent} is a package but setup.py does not ship {name}"


def test_every_module_and_config_is_in_the_wheel(setup_module_vars):
    packaged = _build_py_sources(setup_module_vars)
    expected = _tree_files((".py", ".yaml"))
    missing = sorted(expected - packaged)
    assert not missing, f"in the tree but not in a built wheel: {missing}"
    # the shipped configs the CLI resolves by name are among them
    assert "configs/quickstart.yaml" in packaged
    assert "configs/datasets/criteo.yaml" in packaged


def test_no_folder_of_python_modules_lacks_an_init():
    """A folder of modules without __init__.py would be skipped by find_packages silently."""
    for folder in TREES:
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            assert (path.parent / "__init__.py").is_file(), \
                f"{path.parent} holds modules but no __init__.py: it would not be packaged"


@pytest.mark.slow
def test_sdist_holds_what_a_build_from_it_needs(tmp_path):
    pytest.importorskip("build")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, text=True,
                   env={**os.environ, "HMOE_BUILD_CUDA": "0"},
                   cwd=tmp_path)  # not the root: its build/ folder would shadow the build module
    (sdist,) = tmp_path.glob("hmoe-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    needed = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    needed |= _tree_files((".py", ".yaml"))
    needed |= {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md"}
    missing = sorted(needed - names)
    assert not missing, f"not in the sdist: {missing}"
