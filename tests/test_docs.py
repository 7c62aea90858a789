"""The documentation keeps up with the code it documents."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from million.compute import hookspecs

DOCS = Path(__file__).parent.parent / "docs"


def test_every_hook_is_documented_with_its_signature():
    text = (DOCS / "plugins.md").read_text()
    documented = set(re.findall(r"^### (\w+\([^)]*\))$", text, re.M))
    for name, function in inspect.getmembers(hookspecs, inspect.isfunction):
        if hasattr(function, "million_spec"):
            signature = f"{name}({', '.join(inspect.signature(function).parameters)})"
            assert signature in documented, f"docs/plugins.md has no heading '### {signature}'"


def test_the_readme_starts_with_the_two_commands():
    readme = (DOCS.parent / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert block is not None
    commands = block.group(1).strip().splitlines()
    assert commands == [
        "pip install . ./src/million_demo && million run --plugin demo",
        "pip install nox && nox -s tests",
    ]
    ci = (DOCS.parent / ".ci" / "run").read_text()
    assert "nox -s tests" in ci


def test_every_nox_session_the_docs_name_exists():
    root = DOCS.parent
    noxfile = (root / "noxfile.py").read_text()
    defined = set(re.findall(r"^@nox\.session\ndef (\w+)\(", noxfile, re.M))
    texts = [root / "README.md", *DOCS.glob("*.md"), *(root / "benchmarks").glob("*.py")]
    named = {name for path in texts for name in re.findall(r"nox -s (\w+)", path.read_text())}
    assert named and named <= defined, f"named in the docs but not in noxfile.py: {named - defined}"
    default = re.search(r"nox\.options\.sessions = \[(.*)\]", noxfile)
    assert default is not None and set(re.findall(r'"(\w+)"', default.group(1))) <= defined
