"""The JAX door's tests (jax_cases.py) in a pytest process of their own: once JAX has run, its
threads make every later os.fork() in the same process unsafe (JAX warns so), and the suite's
multi-process tests fork; the parent stays free of JAX."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.mark.timeout(900)
def test_the_jax_door_in_a_process_of_its_own(tmp_path):
    pytest.importorskip("jax")
    junit = tmp_path / "jax.xml"
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml",
         str(junit), os.path.join(HERE, "jax_cases.py")],
        capture_output=True, text=True, timeout=840, cwd=ROOT,
    )  # fmt: skip
    cases = list(ET.parse(junit).getroot().iter("testcase")) if junit.exists() else []
    failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]  # fmt: skip
    assert p.returncode == 0 and not failed, f"failed: {failed}\n{p.stdout[-6000:]}"
    assert len(cases) >= 8 and all(c.find("skipped") is None for c in cases)
