"""The layers of DESIGN.md §2 hold: imports point down, and the cores load no trio."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import million

ROOT = Path(__file__).parent.parent
CORES = [
    "million.wire.codec",
    "million.relay.core",
    "million.replica.core",
    "million.compute.computation",
]


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the package under ``root``, with the contracts of its pyproject.toml."""
    return subprocess.run(
        [Path(sys.executable).parent / "lint-imports"],
        cwd=root,
        env={"PYTHONPATH": str(root / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )


def package_copy(tmp_path: Path) -> Path:
    """The package and its contracts, copied where they may be broken."""
    shutil.copytree(ROOT / "src" / "million", tmp_path / "src" / "million")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_contracts_hold(tmp_path):
    result = lint_imports(package_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_the_relay_importing_the_computation_breaks_the_layers(tmp_path):
    root = package_copy(tmp_path)
    core = root / "src" / "million" / "relay" / "core.py"
    core.write_text(core.read_text() + "\nimport million.compute.tree  # noqa\n")
    result = lint_imports(root)
    assert result.returncode == 1
    assert "Layers point down" in result.stdout and "BROKEN" in result.stdout
    assert "million.relay.core -> million.compute.tree" in result.stdout


def test_a_core_importing_trio_breaks_its_contract(tmp_path):
    root = package_copy(tmp_path)
    core = root / "src" / "million" / "replica" / "core.py"
    core.write_text(core.read_text() + "\nimport trio  # noqa\n")
    result = lint_imports(root)
    assert result.returncode == 1
    assert "million.replica.core is not allowed to import trio" in result.stdout


def test_the_cores_load_without_trio():
    loaded = "sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'trio_websocket', 'websockets'))"
    code = f"import sys; import {', '.join(CORES)}; print({loaded})"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_the_public_api_is_importable_from_the_package():
    for name in million.__all__:
        assert getattr(million, name) is not None
    assert million.open_reflector.__module__ == "million.relay.server"
