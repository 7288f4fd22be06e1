"""The test harness does what `launch/test.sh` relies on.

`--dist loadgroup` must send every test of an `xdist_group` to one worker: a module whose tests
share an expensive module fixture (the export matrix: 4 trainings and 8 exports) names a group
so that the fixture is built once. pytest 9.2 silently broke that with pytest-xdist 3.8
(pytest-dev/pytest-xdist#1386): each worker built the matrix, ~2.5 minutes more per run.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_loadgroup_sends_a_group_to_one_worker(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_grouped.py").write_text(
        "import os, pytest\n"
        "pytestmark = pytest.mark.xdist_group('one')\n"
        "@pytest.mark.parametrize('i', range(8))\n"
        "def test_where(i):\n"
        f"    with open({str(tmp_path / 'workers')!r}, 'a') as f:\n"
        "        f.write(os.environ['PYTEST_XDIST_WORKER'] + '\\n')\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q",
         "-p", "no:cacheprovider", "--rootdir", str(tests), str(tests)],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    workers = (tmp_path / "workers").read_text().split()
    assert len(workers) == 8 and len(set(workers)) == 1, f"the group ran on {workers}"
