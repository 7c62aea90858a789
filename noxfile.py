"""Sessions: tests (the CI gate), lint (ruff, import contracts, mypy), docs, bench."""

import os
import shutil

import nox

nox.options.sessions = ["tests", "lint", "docs"]
nox.options.default_venv_backend = "venv"

SOURCES = ["src", "tests", "benchmarks", "examples", "noxfile.py"]


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]", "-e", "src/million_demo", "-e", "tests/testplugin")
    _install_chromium(session)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Style, the layers' import contracts (pyproject.toml), and strict typing of src/."""
    session.install("-e", ".[lint]", "-e", "src/million_demo")
    session.run("ruff", "check", *SOURCES)
    session.run("ruff", "format", "--check", *SOURCES)
    session.run("lint-imports")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation in strict mode: a broken link or a page left out fails."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", str(session.create_tmp() + "/site"))


@nox.session
def bench(session: nox.Session) -> None:
    """``nox -s bench`` runs the relay benchmark; ``-- runs``, ``-- scale``, ``-- presence``,
    ``-- hostile`` or ``-- peers`` (million beside Dask, with the ``peers`` extra) the others."""
    extras = ".[bench,peers]" if session.posargs[:1] == ["peers"] else ".[bench]"
    session.install("-e", extras, "-e", "src/million_demo")
    if session.posargs[:1] in (["runs"], ["scale"], ["presence"], ["hostile"], ["peers"]):
        session.run("python", f"benchmarks/{session.posargs[0]}.py", *session.posargs[1:])
    else:
        session.run("python", "benchmarks/relay.py", *session.posargs)


def _install_chromium(session: nox.Session) -> None:
    """Debian's Chromium for the web page's browser test, where it can be installed."""
    if shutil.which("chromium") or not shutil.which("apt-get") or os.geteuid() != 0:
        return
    install = "apt-get install -y -qq chromium"
    command = f"{install} || (apt-get update -qq && {install})"
    session.run("bash", "-c", command, external=True, env={"DEBIAN_FRONTEND": "noninteractive"})
