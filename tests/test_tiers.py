"""The tiers' tripwire (tests/conftest.py) catches what it must: a test that starts one
of the project's processes without the ``process`` marker fails; marked, it passes; a
test that starts another program passes unmarked. Run by pytest in its own process, on
a folder holding only the suite's conftest and these cases."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

CASES = '''
import subprocess, sys
import pytest

def test_unmarked_starts_a_role():
    subprocess.run([sys.executable, "-m", "common.no_such_module"], capture_output=True)

@pytest.mark.process
def test_marked_starts_a_role():
    subprocess.run([sys.executable, "-m", "common.no_such_module"], capture_output=True)

def test_unmarked_starts_another_program():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
'''


def test_an_unmarked_test_that_starts_a_process_of_the_project_fails(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    process: starts the testbed's processes\n")
    (tmp_path / "test_cases.py").write_text(CASES)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = r.stdout
    assert r.returncode == 1, out
    assert "ERROR test_cases.py::test_unmarked_starts_a_role" in out, out
    assert "started 'python -m common.no_such_module' but is not marked process" in out, out
    assert "PASSED test_cases.py::test_marked_starts_a_role" in out, out
    assert "PASSED test_cases.py::test_unmarked_starts_another_program" in out, out
