"""Sessions: tests (the CI gate), lint, bench."""

import os
import shutil

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]", "-e", "src/million_demo", "-e", "tests/testplugin")
    _install_chromium(session)
    session.run("pytest", *session.posargs)


def _install_chromium(session: nox.Session) -> None:
    """Debian's Chromium for the web page's browser test, where it can be installed."""
    if shutil.which("chromium") or not shutil.which("apt-get") or os.geteuid() != 0:
        return
    install = "apt-get install -y -qq chromium"
    command = f"{install} || (apt-get update -qq && {install})"
    session.run("bash", "-c", command, external=True, env={"DEBIAN_FRONTEND": "noninteractive"})
