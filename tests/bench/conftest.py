"""Fixtures of the benchmark tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def bench_cache(tmp_path_factory):
    """The benchmark cache (``--cache-dir``) of every ``gpuload bench`` run in this folder: the
    demo table of a row count (and the rows as JPEG files) is made by the first run that needs
    it and reused by the later ones, as by any later run of the benchmark."""
    return tmp_path_factory.mktemp("bench-cache")
