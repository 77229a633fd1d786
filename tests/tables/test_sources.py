"""Where robot and vision data comes from: Hugging Face image values, PIL images, image arrays,
iterables of column batches, WebDataset tar shards, and pandas nulls; each with the one clear
error for what it cannot take."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from gpuload.errors import SchemaError
from gpuload.sources import WebDataset, expand_braces

from ..helpers import jpeg, png, textured_image


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


# -- Hugging Face datasets image values ---------------------------------------------------------
def test_hf_image_dicts(client, tmp_path):
    rng = np.random.default_rng(0)
    a, b = jpeg(rng), png(rng)
    (tmp_path / "b.png").write_bytes(b)
    values = [{"bytes": a, "path": "a.jpg"}, {"bytes": None, "path": str(tmp_path / "b.png")}]
    t = client.ingest("hf", {"image": values, "label": [0, 1]})
    assert t.schema["image"].kind == "image" and t.schema["image"].codec == "mixed"
    assert t[:]["image"] == [a, b]


@pytest.mark.parametrize(
    "value,match",
    [
        ({"bytes": None, "path": "no/such/file.png"}, r"row 1, column 'image': .* not a file"),
        ({"bytes": None, "path": "https://x.org/a.jpg"}, r"row 1, column 'image': .* is a URL"),
        ({"bytes": None, "path": None}, r"row 1, column 'image': .* neither bytes nor a path"),
        ({"bytes": b"not an image", "path": None}, r"row 1, column 'image': 12 bytes are not"),
    ],
)
def test_hf_image_dicts_refused(client, value, match):
    rng = np.random.default_rng(0)
    with pytest.raises(SchemaError, match=match):
        client.ingest("bad", {"image": [{"bytes": jpeg(rng), "path": None}, value]})
    assert "bad" not in client.list_tables()


def test_parquet_image_structs(client, tmp_path):
    """LeRobot and Hugging Face image datasets: struct<bytes: binary, path: string>."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    imgs = [jpeg(rng) for _ in range(5)]
    (tmp_path / "f.jpg").write_bytes(imgs[4])
    struct = pa.array(
        [{"bytes": x, "path": f"{i}.jpg"} for i, x in enumerate(imgs[:4])]
        + [{"bytes": None, "path": str(tmp_path / "f.jpg")}],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = pa.table({"observation.image": struct, "frame_index": pa.array(range(5))})
    pq.write_table(table, tmp_path / "episode.parquet")
    t = client.ingest("lerobot", str(tmp_path / "episode.parquet"))
    assert t.schema["observation.image"].type_string() == "image/jpeg"
    assert t[:]["observation.image"] == imgs
    other = pa.table({"s": pa.array([{"a": 1}], type=pa.struct([("a", pa.int64())]))})
    with pytest.raises(SchemaError, match=r"column 's': .*only image values struct<bytes"):
        client.ingest("struct", other)


# -- PIL images and image arrays ----------------------------------------------------------------
def test_pil_images_png_by_default_lossless(client):
    rng = np.random.default_rng(2)
    arrays = [textured_image(rng, 20, 30), textured_image(rng, 24, 16, channels=1)]
    t = client.ingest("pil", {"image": [Image.fromarray(a) for a in arrays]})
    assert t.schema["image"].type_string() == "image/png"
    for got, want in zip(t[:]["image"], arrays):
        np.testing.assert_array_equal(_pixels(got), want)


def test_pil_keep_and_jpeg(client, tmp_path):
    rng = np.random.default_rng(3)
    orig = jpeg(rng)
    (tmp_path / "f.jpg").write_bytes(orig)
    opened = [Image.open(io.BytesIO(orig)), Image.open(tmp_path / "f.jpg")]
    t = client.ingest("keep", {"image": opened}, image_format="keep")
    assert t[:]["image"] == [orig, orig]  # the original bytes: no re-encoding loss
    edited = Image.open(io.BytesIO(orig))
    edited.load()
    edited.putpixel((0, 0), (255, 0, 0))
    t = client.ingest("edited", {"image": [edited]}, image_format="keep")
    got = t[0]["image"]
    assert got != orig and got.startswith(b"\x89PNG")  # changed in place: not its old bytes
    np.testing.assert_array_equal(_pixels(got), np.asarray(edited))
    fresh = Image.fromarray(textured_image(rng, 16, 16))
    t = client.ingest("jpeg", {"image": [Image.open(io.BytesIO(orig)), fresh]}, image_format="jpeg")
    assert t[0]["image"] == orig and t.schema["image"].codec == "jpeg"
    with pytest.raises(ValueError, match="image_format must be one of"):
        client.ingest("x", {"image": [fresh]}, image_format="webp")


def test_uint8_arrays_to_image_columns(client):
    rng = np.random.default_rng(4)
    rgb, gray = textured_image(rng, 12, 10), textured_image(rng, 9, 7, channels=1)
    t = client.ingest("arr", {"image": [rgb, gray, gray[..., None]]}, schema={"image": "image"})
    assert t.schema["image"].codec == "png"
    for got, want in zip(t[:]["image"], [rgb, gray, gray]):
        np.testing.assert_array_equal(_pixels(got), want)
    plain = client.ingest("plain", {"image": [rgb, rgb]})  # without a schema: still an array
    assert plain.schema["image"].type_string() == "uint8[12,10,3]"
    with pytest.raises(SchemaError, match=r"row 1, column 'image': an image array must be uint8"):
        client.ingest("bad", {"image": [rgb, rgb.astype(np.float32)]}, schema={"image": "image"})


# -- iterables of column batches ------------------------------------------------------------------
def test_column_batches_commit_once(client):
    pa = pytest.importorskip("pyarrow")
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(5)
    imgs = [jpeg(rng, 16, 16) for _ in range(9)]

    def gen():
        yield {"image": imgs[:3], "label": np.arange(3)}
        yield pa.record_batch({"image": pa.array(imgs[3:6], pa.binary()), "label": [3, 4, 5]})
        yield pd.DataFrame({"image": imgs[6:], "label": [6, 7, 8]})

    t = client.ingest("cb", gen())
    assert t.version == 1 and len(t) == 9
    assert t[:]["image"] == imgs and t[:]["label"].tolist() == list(range(9))


def test_numeric_batches_need_batches_true(client):
    def gen():
        for k in range(3):
            yield {"state": np.full((4, 2), k, np.float32), "label": np.arange(4) + 4 * k}

    t = client.ingest("num", gen(), batches=True)
    assert len(t) == 12 and t.schema.describe() == "state: float32[2], label: int64"
    assert t[:]["label"].tolist() == list(range(12))
    rows = client.ingest("rows", iter([{"a": np.ones(3), "b": np.zeros(3)}] * 2))
    assert len(rows) == 2 and rows.schema.describe() == "a: float64[3], b: float64[3]"


def test_failing_batches_leave_the_table_unchanged(client, tmp_path):
    client.ingest("t", {"x": ["a", "b"], "n": [1, 2]})
    chunks = set(os.listdir(tmp_path / "root" / "t" / "chunks"))

    def gen():
        for k in range(5):
            if k == 3:
                raise RuntimeError("source died")
            yield {"x": [f"r{k}"] * 100, "n": list(range(100))}

    with pytest.raises(RuntimeError, match="source died"):
        client.ingest("t", gen(), mode="append", chunk_bytes=256)
    t = client.open_table("t")
    assert t.version == 1 and t[:]["x"] == ["a", "b"]
    assert set(os.listdir(tmp_path / "root" / "t" / "chunks")) == chunks

    def uneven():
        yield {"x": ["a"], "n": [1]}
        yield {"x": ["a", "b"], "n": [1]}

    with pytest.raises(SchemaError, match=r"batch 1 \(from row 1\): columns have different"):
        client.ingest("t", uneven(), mode="append")
    assert client.open_table("t").version == 1


# -- WebDataset tar shards ------------------------------------------------------------------------
def _tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def _shards(tmp_path, n_shards=3, per=4):
    rng = np.random.default_rng(6)
    want = []
    for s in range(n_shards):
        members = []
        for i in range(per):
            key = f"s{s}/{s * per + i:06d}"
            img, st = jpeg(rng, 16, 16), rng.normal(size=(i + 1, 3)).astype(np.float32)
            meta = json.dumps({"k": key, "__import__": "os"})
            members += [(f"{key}.jpg", img), (f"{key}.cls", f"{s * per + i}\n".encode()),
                        (f"{key}.json", meta.encode()), (f"{key}.state.npy", _npy(st))]  # fmt: skip
            want.append((img, s * per + i, meta, st))
        _tar(tmp_path / f"shard-{s:03d}.tar", members)
    return want


def test_webdataset_shards(client, tmp_path):
    want = _shards(tmp_path)
    pattern = str(tmp_path / "shard-{000..002}.tar")
    wds = WebDataset(
        pattern, columns={"jpg": "image", "cls": ("label", "int64"), "json": "meta",
                          "state.npy": ("state", "float32[*,3]")}
    )  # fmt: skip
    t = client.ingest("wds", wds, chunk_bytes=4096)
    assert t.schema.describe() == "image: image/jpeg, label: int64, meta: text, state: float32[*,3]"
    assert len(t) == 12
    assert t[:]["image"] == [w[0] for w in want]
    assert t[:]["label"].tolist() == [w[1] for w in want]
    assert t[:]["meta"] == [w[2] for w in want]  # JSON kept as text, never evaluated
    for got, w in zip(t[:]["state"], want):
        np.testing.assert_array_equal(got, w[3])
    # a brace pattern alone: every extension a column named after it, cls as text
    t = client.ingest("auto", pattern)
    assert t.schema.describe() == "jpg: image/jpeg, cls: text, json: text, state.npy: float32[*,3]"
    assert t[5]["cls"] == "5\n"


def test_webdataset_over_fsspec_urls(client, tmp_path):
    import fsspec

    want = _shards(tmp_path, n_shards=2, per=3)
    fs = fsspec.filesystem("memory")
    for s in range(2):
        fs.pipe(f"/wds-test/shard-{s}.tar", (tmp_path / f"shard-{s:03d}.tar").read_bytes())
    urls = ["memory://wds-test/shard-0.tar", "memory://wds-test/shard-1.tar"]
    t = client.ingest("mem", WebDataset(urls, columns={"jpg": "image"}))
    assert t[:]["image"] == [w[0] for w in want]


@pytest.mark.parametrize(
    "members,columns,match",
    [
        ([("a.jpg", b"\xff\xd8\xffx"), ("a.cls", b"1"), ("b.jpg", b"\xff\xd8\xffy")], None,
         r"shard .*bad.tar, key 'b', column 'cls': the sample has no member with extension .cls"),
        ([("a.jpg", b"\xff\xd8\xffx"), ("a.pyd", b"\x80\x04K\x01.")], None,
         r"key 'a', member 'a.pyd': a pickle; gpuload never unpickles"),
        ([("a.npy", _npy(np.array([{"x": 1}], dtype=object)))], None,
         r"key 'a', column 'npy': not a readable .npy array without pickle"),
        ([("a.cls", b"seven")], {"cls": ("label", "int64")}, r"key 'a', column 'label': 'seven'"),
        ([("a.txt", b"x"), ("b.txt", b"y"), ("a.txt", b"z")], None, r"key 'a' appears in two"),
    ],
)  # fmt: skip
def test_webdataset_refusals(client, tmp_path, members, columns, match):
    _tar(tmp_path / "bad.tar", members)
    with pytest.raises(SchemaError, match=match):
        client.ingest("bad", WebDataset(str(tmp_path / "bad.tar"), columns=columns))
    assert "bad" not in client.list_tables()


def test_webdataset_pickle_mapping_refused():
    with pytest.raises(SchemaError, match=r"\.pickle are pickles"):
        WebDataset("x.tar", columns={"pickle": "obj"})


def test_expand_braces():
    assert expand_braces("s-{000..003}.tar") == [f"s-{i:03d}.tar" for i in range(4)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("s-{3..1}.tar") == ["s-3.tar", "s-2.tar", "s-1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="unbalanced braces"):
        expand_braces("s-{000..003.tar")


# -- pandas nulls -------------------------------------------------------------------------------
def test_pandas_nulls_are_refused_nan_is_a_value(client):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"x": pd.array([1, pd.NA, 3], dtype="Int64"), "y": [1.0, 2.0, 3.0]})
    with pytest.raises(SchemaError, match=r"row 1, column 'x': null value"):
        client.ingest("n", df)
    ok = client.ingest(
        "f", pd.DataFrame({"x": pd.array([1, 2], dtype="Int64"), "y": [1.0, np.nan]})
    )
    assert ok.schema.describe() == "x: int64, y: float64"
    assert ok[:]["x"].tolist() == [1, 2] and np.isnan(ok[1]["y"])
    cases = [(pd.Series(["a", None, "c"], dtype="string"), 1), (pd.Series([b"a", b"b", None]), 2)]
    for col, row in cases:
        with pytest.raises(SchemaError, match=rf"row {row}, column 's': null value"):
            client.ingest("s", pd.DataFrame({"s": col}))
    rng = np.random.default_rng(7)
    pil = pd.DataFrame({"im": [Image.fromarray(textured_image(rng, 8, 8)), None]})
    with pytest.raises(SchemaError, match=r"row 1, column 'im': null value"):
        client.ingest("p", pil)
    assert set(client.list_tables()) == {"f"}
