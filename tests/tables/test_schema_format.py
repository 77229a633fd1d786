import json

import numpy as np
import pytest

import gpuload
from gpuload.errors import FormatError, SchemaError, TableNotFoundError
from gpuload.format import Manifest
from gpuload.schema import Column, Schema, detect_codec, parse_type

from ..helpers import jpeg, png


def test_parse_type_strings():
    assert parse_type("a", "image").kind == "image"
    assert parse_type("a", "image/png").codec == "png"
    assert parse_type("a", "float32[14]") == Column("a", "array", "float32", (14,))
    assert parse_type("a", "uint8[2, 3]").shape == (2, 3)
    assert parse_type("a", "int").dtype == "int64"
    assert parse_type("a", "text").kind == "text"
    with pytest.raises(SchemaError, match="cannot parse"):
        parse_type("a", "float32[")
    with pytest.raises(SchemaError, match="dtype"):
        parse_type("a", "complex64")


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "a\\b", "..", ".hidden", "x" * 200, "a\x00"])
def test_bad_names_rejected(bad):
    with pytest.raises(SchemaError, match="invalid"):
        Column(bad, "bytes")


def test_detect_codec():
    rng = np.random.default_rng(0)
    assert detect_codec(jpeg(rng)) == "jpeg"
    assert detect_codec(png(rng)) == "png"
    assert detect_codec(b"hello world!") is None


def test_schema_roundtrip():
    s = Schema.from_spec(
        {"image": "image/jpeg", "state": "float32[14]", "label": "int64", "t": "text"}
    )
    assert Schema.from_json(json.loads(json.dumps(s.to_json()))) == s
    with pytest.raises(SchemaError, match="duplicate"):
        Schema((Column("a", "bytes"), Column("a", "text")))


def _write_table(tmp_path):
    return gpuload.ingest(tmp_path / "t", {"x": [b"abc", b"de"], "y": np.array([1, 2])})


def _edit_manifest(tmp_path, fn):
    p = tmp_path / "t" / "manifest.json"
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


def test_manifest_unknown_version(tmp_path):
    _write_table(tmp_path)
    _edit_manifest(tmp_path, lambda d: d.update(format_version=99))
    with pytest.raises(FormatError, match="format version 99 is not supported"):
        gpuload.open_table(tmp_path / "t")


def test_manifest_malformed_json(tmp_path):
    _write_table(tmp_path)
    (tmp_path / "t" / "manifest.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        gpuload.open_table(tmp_path / "t")


@pytest.mark.parametrize(
    "path",
    ["../../etc/passwd", "/etc/passwd", "chunks/../../x.chunk", "chunks/abc.chunk", "s3://b/x"],
)
def test_manifest_path_traversal_refused(tmp_path, path):
    _write_table(tmp_path)
    _edit_manifest(tmp_path, lambda d: d["chunks"][0].update(file=path))
    with pytest.raises(FormatError, match="chunk"):
        gpuload.open_table(tmp_path / "t")


def test_manifest_section_outside_chunk(tmp_path):
    _write_table(tmp_path)

    def grow(d):
        d["chunks"][0]["columns"]["x"]["data"][1] = 10**9

    _edit_manifest(tmp_path, grow)
    with pytest.raises(FormatError, match="outside the chunk"):
        gpuload.open_table(tmp_path / "t")


def test_manifest_rows_mismatch(tmp_path):
    _write_table(tmp_path)
    _edit_manifest(tmp_path, lambda d: d.update(num_rows=5))
    with pytest.raises(FormatError, match="num_rows"):
        gpuload.open_table(tmp_path / "t")


def test_not_a_table(tmp_path):
    with pytest.raises(TableNotFoundError, match="missing manifest.json"):
        gpuload.open_table(tmp_path / "nothing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format": "parquet"}))
    with pytest.raises(FormatError, match="not a gpuload table"):
        gpuload.open_table(tmp_path / "other")


def test_manifest_is_plain_json_never_pickle(tmp_path):
    t = _write_table(tmp_path)
    raw = (tmp_path / "t" / "manifest.json").read_bytes()
    d = json.loads(raw)
    assert d["format"] == "gpuload-table" and d["format_version"] == 2
    m = Manifest.loads(raw, "x")
    assert m.num_rows == len(t) == 2


def test_chunk_sections_aligned(tmp_path):
    t = gpuload.ingest(
        tmp_path / "t",
        {
            "x": [b"a" * (i + 1) for i in range(37)],
            "s": np.ones((37, 3), np.float32),
            "l": np.arange(37),
        },
    )
    for ch in t.manifest.chunks:
        for sec in list(ch.data.values()) + list(ch.offsets.values()):
            assert sec.offset % 64 == 0
