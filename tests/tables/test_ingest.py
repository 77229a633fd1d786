import os

import numpy as np
import pytest

import gpuload
from gpuload.errors import SchemaError

from ..helpers import jpeg, kill_writer_midway, png, robot_columns


def _rows(cols):
    n = len(cols["label"])
    return [{k: v[i] for k, v in cols.items()} for i in range(n)]


def _check_same(t, cols):
    d = t[:].to_dict()
    assert d["image"] == list(cols["image"])
    np.testing.assert_array_equal(d["state"], np.asarray(cols["state"]))
    np.testing.assert_array_equal(d["label"], np.asarray(cols["label"]))
    assert d["text"] == list(cols["text"])


def test_ingest_iterable_of_rows(client):
    cols = robot_columns(40)
    t = client.ingest("rows", iter(_rows(cols)))  # a generator: no len()
    _check_same(t, cols)
    assert t.schema["state"].type_string() == "float32[14]"


def test_ingest_pyarrow_and_parquet(client, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    cols = robot_columns(50)
    table = pa.table(
        {
            "image": pa.array(cols["image"], type=pa.binary()),
            "state": pa.FixedSizeListArray.from_arrays(pa.array(cols["state"].ravel()), 14),
            "label": pa.array(cols["label"]),
            "text": pa.array(cols["text"]),
        }
    )
    t = client.ingest("arrow", table)
    _check_same(t, cols)
    # variable-size lists of equal length also become fixed-shape arrays
    pq.write_table(
        table.set_column(1, "state", pa.array([list(r) for r in cols["state"]])),
        tmp_path / "d.parquet",
    )
    t = client.ingest("pq", str(tmp_path / "d.parquet"))
    _check_same(t, cols)
    assert t.schema["state"].type_string() == "float32[14]"


def test_ingest_parquet_ragged_lists(client, tmp_path):
    """Lists whose lengths vary become a ragged column; lists varying below the first
    dimension are refused (only the first dimension of a ragged column varies)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"v": pa.array([[1.0, 2.0], [3.0]])}), tmp_path / "r.parquet")
    t = client.ingest("r", str(tmp_path / "r.parquet"))
    assert t.schema["v"].type_string() == "float64[*]"
    assert [list(x) for x in t[:]["v"]] == [[1.0, 2.0], [3.0]]
    nested = pa.array([[[1.0, 2.0], [3.0, 4.0]], [[5.0], [6.0, 7.0]]])
    pq.write_table(pa.table({"v": nested}), tmp_path / "n.parquet")
    with pytest.raises(SchemaError, match=r"row 1, column 'v': nested lists whose inner"):
        client.ingest("n", str(tmp_path / "n.parquet"))
    assert "n" not in client.list_tables()


def test_ingest_arrow_nulls_rejected(client):
    pa = pytest.importorskip("pyarrow")
    with pytest.raises(SchemaError, match=r"row 1, column 'x': null"):
        client.ingest("n", pa.table({"x": pa.array([1, None, 3])}))


def test_ingest_pandas(client):
    pd = pytest.importorskip("pandas")
    cols = robot_columns(30)
    df = pd.DataFrame(
        {
            "image": cols["image"],
            "state": list(cols["state"]),
            "label": cols["label"],
            "text": cols["text"],
        }
    )
    t = client.ingest("df", df)
    _check_same(t, cols)


def test_ingest_image_folder(client, tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    expected = {}
    for cls in ["cat", "dog", "zebra"]:
        (root / cls).mkdir(parents=True)
        for i in range(4):
            data = jpeg(rng) if i % 2 == 0 else png(rng)
            ext = "jpg" if i % 2 == 0 else "png"
            (root / cls / f"{i}.{ext}").write_bytes(data)
            expected[f"{cls}/{i}.{ext}"] = (data, ["cat", "dog", "zebra"].index(cls))
    (root / "cat" / "notes.txt").write_text("not an image")
    t = client.ingest("folder", str(root))
    assert len(t) == 12
    assert t.schema["label"].metadata["class_names"] == ["cat", "dog", "zebra"]
    assert t.schema["image"].codec == "mixed"
    for row in t:
        d = row.to_dict()
        data, label = expected[d["path"]]
        assert d["image"] == data and d["label"] == label


def test_ingest_from_table_and_cli_sources(client):
    cols = robot_columns(20)
    src = client.ingest("src", cols)
    t = client.ingest("copy", src)
    _check_same(t, cols)


def test_explicit_schema(client):
    t = client.ingest(
        "s",
        {"x": [1, 2, 3], "v": [[1, 2], [3, 4], [5, 6]]},
        schema={"x": "float32", "v": "int16[2]"},
    )
    assert t.schema["x"].dtype == "float32" and t[1]["x"] == np.float32(2)
    assert t[2]["v"].dtype == np.int16 and list(t[2]["v"]) == [5, 6]


@pytest.mark.parametrize(
    "data,schema,match",
    [
        ({"x": [1, 2], "y": [1, 2]}, {"x": "int64"}, r"unknown column\(s\) \['y'\]"),
        ({"x": [1, 2]}, {"x": "int64", "y": "text"}, r"missing column\(s\) \['y'\]"),
        ({"x": [1.5, 2.5]}, {"x": "int64"}, "float64 values cannot be stored as int64"),
        ({"x": ["a", "b"]}, {"x": "int64"}, "expected numbers"),
        ({"x": [[1, 2], [1, 2, 3]]}, {"x": "int64[2]"}, r"row 1, column 'x': shape \(3,\)"),
        ({"x": [[1, 2], [[1, 2]]]}, None, r"row 1, column 'x': shape \(1, 2\)"),
        ({"x": [b"a", "b"]}, {"x": "bytes"}, r"row 1, column 'x': expected bytes"),
        ({"x": [b"not an image"]}, {"x": "image"}, "not a recognised image"),
        ({"x": [300]}, {"x": "uint8"}, "out of range for uint8"),
        ({"x": [None]}, None, "None cannot be stored"),
        ({"x": [1, 2, "a", 4]}, None, r"row 2, column 'x': expected numbers, got str 'a'"),
        ({"x": [1] * 1500 + ["b"]}, None, r"row 1500, column 'x': expected numbers, got str"),
        ({"x": [1.0, 2.0, None]}, None, r"row 2, column 'x': expected numbers, got NoneType"),
        ({"x": [1, 2], "y": [1]}, None, "different lengths"),
    ],
)
def test_bad_input_one_clear_error(client, data, schema, match):
    with pytest.raises(SchemaError, match=match):
        client.ingest("bad", data, schema=schema)
    assert "bad" not in client.list_tables()


def test_declared_codec_mismatch(client):
    rng = np.random.default_rng(0)
    with pytest.raises(SchemaError, match="png image in a column declared image/jpeg"):
        client.ingest("c", {"im": [jpeg(rng), png(rng)]}, schema={"im": "image/jpeg"})


def test_append_schema_mismatch_keeps_table(client):
    client.ingest("a", {"x": [1, 2], "s": [[1.0, 2.0], [3.0, 4.0]]})
    with pytest.raises(SchemaError, match="unknown column"):
        client.ingest("a", {"x": [3], "s": [[1.0, 2.0]], "z": [1]}, mode="append")
    with pytest.raises(SchemaError, match=r"shape \(3,\)"):
        client.ingest("a", {"x": [3], "s": [[1.0, 2.0, 3.0]]}, mode="append")
    t = client.open_table("a")
    assert len(t) == 2 and t.version == 1


def test_failure_mid_ingest_leaves_previous_version(client, tmp_path):
    cols = robot_columns(50)
    client.ingest("t", cols, chunk_bytes=16 << 10)
    chunk_dir = tmp_path / "root" / "t" / "chunks"
    before = set(os.listdir(chunk_dir))

    def rows():
        for i, r in enumerate(_rows(robot_columns(3000, seed=2))):
            if i == 2500:
                raise RuntimeError("source died")
            yield r

    with pytest.raises(RuntimeError, match="source died"):
        client.ingest("t", rows(), mode="append", chunk_bytes=16 << 10)
    t = client.open_table("t")
    assert len(t) == 50 and t.version == 1
    _check_same(t, cols)
    assert set(os.listdir(chunk_dir)) == before  # the aborted writer removed its chunks


def test_killed_ingest_leaves_previous_version(tmp_path):
    """SIGKILL a writer in the middle of an append: the committed version stays fully readable."""
    root = tmp_path / "root"
    c = gpuload.Client(root)
    cols = robot_columns(30)
    c.ingest("t", cols)
    kill_writer_midway(root, "t", cols["image"][0])
    chunk_files = os.listdir(root / "t" / "chunks")
    t = c.open_table("t")
    assert len(t) == 30 and t.version == 1
    _check_same(t, cols)
    assert len(chunk_files) > len(t.manifest.chunks)  # orphaned chunks exist but are invisible
