"""The suite's two tiers (issue 27).

``process``: a test that starts the testbed's own processes (a role, the launcher, the
controller, a script of the project, a proxy, containers, a remote host). ``make test``
runs every test; ``make check`` leaves these out (``-m "not process"``).

A test that starts one of the project's processes without the marker fails, so the
fast tier cannot grow a whole-testbed run unnoticed. What counts is seen, not guessed:
an audit hook records every ``subprocess.Popen`` the suite's own process makes while a
test runs (the processes those start are theirs, not the test's; a module-scoped
fixture's are made before any test's record starts, so mark the tests that use it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# python -m <one of these>: a process of the project
PROJECT_PACKAGES = {"central", "edge", "device", "common", "scripts", "tests"}
# programs that stand a testbed up in other ways
TESTBED_PROGRAMS = {"podman", "podman-compose", "docker", "docker-compose", "ssh", "sshd", "ip", "make"}

_started: list[str] = []

# An event or field common/eventschema.py does not declare raises, here and in every
# process the tests start (they inherit the environment); a run in the field logs it.
os.environ["FEDFLY_STRICT_EVENTS"] = "1"


def _project_process(args) -> str | None:
    """What ``args`` (a Popen argv or command string) starts, if it is one of the project's processes."""
    if isinstance(args, (str, bytes, os.PathLike)):
        argv = [os.fsdecode(args)]
    else:
        argv = [os.fsdecode(a) for a in args]
    if not argv:
        return None
    if os.path.basename(argv[0]) in TESTBED_PROGRAMS or os.path.basename(argv[0]).startswith("fedfly-"):
        return " ".join(argv[:3])
    for flag, module in zip(argv, argv[1:]):
        if flag == "-m" and module.split(".")[0] in PROJECT_PACKAGES:
            return f"python -m {module}"
    return None


def _audit(event: str, args: tuple) -> None:
    if event == "subprocess.Popen":
        what = _project_process(args[1] if args[1] is not None else args[0])
        if what is not None:
            _started.append(what)


sys.addaudithook(_audit)  # cannot be removed; it only records, and only in this process


@pytest.fixture(autouse=True)
def _tier_is_honest(request):
    _started.clear()
    yield
    if _started and request.node.get_closest_marker("process") is None:
        pytest.fail(f"{request.node.nodeid} started {_started[0]!r} but is not marked process: "
                    "add `pytestmark = pytest.mark.process` to its module, or @pytest.mark.process to it",
                    pytrace=False)
