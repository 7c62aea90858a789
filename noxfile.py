"""Sessions: tests (the CI gate), lint, bench."""

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]", "-e", "src/million_demo", "-e", "tests/testplugin")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "examples", "noxfile.py")


@nox.session
def bench(session: nox.Session) -> None:
    session.install("-e", ".[bench]", "-e", "src/million_demo")
    if session.posargs[:1] in (["runs"], ["scale"]):
        session.run("python", f"benchmarks/{session.posargs[0]}.py", *session.posargs[1:])
    else:
        session.run("python", "benchmarks/relay.py", *session.posargs)
