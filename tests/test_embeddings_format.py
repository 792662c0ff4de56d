"""The embeddings folder format (vidlang/embeddings.py, docs/embeddings.md): round trip and every refusal."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vidlang.embeddings import (
    MANIFEST,
    EmbeddingsDir,
    EmbeddingsFormatError,
    ModelInfo,
    write_embeddings,
    write_manifest,
    write_shard,
)
from vidlang.errors import InputNotFoundError, VidlangUserError

MODEL = ModelInfo("ab" * 32, 8, "/ckpt/tiny.ckpt", "retrieval")


def rows(n: int = 25, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"clip-{i:03d}" for i in rng.permutation(n)]  # ids unrelated to row order
    return ids, [f"videos/{i}.mp4" for i in ids], [f"caption {i}" if j % 3 else None for j, i in enumerate(ids)], x


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path, dtype):
    ids, sources, captions, x = rows()
    e = write_embeddings(tmp_path / "emb", ids, sources, x, MODEL, captions, dtype=dtype, shard_rows=10,
                         protocol={"num_frames": 8})
    assert (e.count, e.dim, e.dtype, len(e.shards)) == (25, 8, dtype, 3)
    assert [s.rows for s in e.shards] == [10, 10, 5] and [s.start for s in e.shards] == [0, 10, 20]
    assert e.model == MODEL and e.protocol == {"num_frames": 8} and e.modality() == "video"
    got = e.read_embeddings()
    assert got.dtype == np.float32 and got.shape == (25, 8)
    np.testing.assert_allclose(got, x, atol=1e-3 if dtype == "float16" else 0)
    keys = e.read_keys()
    assert keys.column("id").to_pylist() == ids and keys.column("source").to_pylist() == sources
    assert keys.column("caption").to_pylist() == captions
    sample = e.sample(7, seed=3)  # rows of the folder, in row order
    picked = [int(np.argmin(np.abs(got - s).sum(1))) for s in sample]
    assert picked == sorted(set(picked)) and len(picked) == 7
    np.testing.assert_array_equal(sample, got[picked])
    assert e.sample(100).shape == (25, 8)  # at most all rows


def test_batches_cover_the_folder_in_order(tmp_path):
    ids, sources, _, x = rows(30)
    e = write_embeddings(tmp_path, ids, sources, x, MODEL, shard_rows=12, dtype="float32")
    starts = [(s, len(b)) for s, b in e.iter_embeddings(batch_rows=5)]
    assert starts == [(0, 5), (5, 5), (10, 2), (12, 5), (17, 5), (22, 2), (24, 5), (29, 1)]


def test_extra_embedding_column(tmp_path):
    ids, sources, captions, x = rows(6)
    write_shard(tmp_path / "a.parquet", ids, sources, x, MODEL, captions, "float32",
                extra_embeddings={"text_embedding": ("text", -x)})
    write_manifest(tmp_path, [("a.parquet", 6)], 8, MODEL, "float32",
                   columns={"embedding": "video", "text_embedding": "text"})
    e = EmbeddingsDir(tmp_path)
    assert e.modality("text_embedding") == "text"
    np.testing.assert_array_equal(e.read_embeddings("text_embedding"), -x)
    with pytest.raises(VidlangUserError, match="no embedding column 'audio'"):
        e.read_embeddings("audio")


def _folder(tmp_path, n=12, dtype="float32"):
    ids, sources, captions, x = rows(n)
    write_embeddings(tmp_path, ids, sources, x, MODEL, captions, dtype=dtype, shard_rows=6)
    return tmp_path


def _edit_manifest(folder, **changes):
    m = json.loads((folder / MANIFEST).read_text())
    m.update(changes)
    (folder / MANIFEST).write_text(json.dumps(m))


def test_unfinished_run_without_manifest(tmp_path):
    f = _folder(tmp_path)
    (f / MANIFEST).unlink()
    with pytest.raises(InputNotFoundError, match="no manifest.json.*has not finished"):
        EmbeddingsDir(f)
    with pytest.raises(InputNotFoundError, match="no such embeddings folder"):
        EmbeddingsDir(tmp_path / "nope")


@pytest.mark.parametrize("change, message", [
    ({"format": "other"}, "not a vidlang embeddings manifest"),
    ({"version": 99}, "format version 99"),
    ({"dim": 0}, "'dim' must be a positive integer"),
    ({"dtype": "int8"}, "'dtype' must be one of"),
    ({"model": {"embed_dim": 8}}, "checkpoint_sha256"),
    ({"count": 5}, "'count' 5 != the shards' rows 12"),
    ({"shards": [{"path": "../x.parquet", "rows": 6}]}, "must be relative, inside the folder"),
    ({"shards": [{"path": "shard-00000.parquet", "rows": 5}, {"path": "shard-00001.parquet", "rows": 6}]},
     "6 rows, but .* lists 5"),
    ({"columns": {"embedding": "video", "text_embedding": "text"}}, "no column 'text_embedding'"),
])
def test_bad_manifest_is_refused_naming_it(tmp_path, change, message):
    f = _folder(tmp_path)
    _edit_manifest(f, **change)
    with pytest.raises(EmbeddingsFormatError, match=message):
        EmbeddingsDir(f)


def test_missing_and_foreign_shards(tmp_path):
    f = _folder(tmp_path)
    (f / "shard-00001.parquet").unlink()
    with pytest.raises(InputNotFoundError, match="shard-00001.parquet: shard listed in .* is missing"):
        EmbeddingsDir(f)
    pq.write_table(pa.table({"id": ["a"], "source": ["b"], "caption": [None]}), f / "shard-00001.parquet")
    with pytest.raises(EmbeddingsFormatError, match="shard-00001.parquet: 1 rows, but"):
        EmbeddingsDir(f)
    _edit_manifest(f, shards=[{"path": "shard-00000.parquet", "rows": 6}, {"path": "shard-00001.parquet", "rows": 1}],
                   count=7)
    with pytest.raises(EmbeddingsFormatError, match="shard-00001.parquet: no column 'embedding'"):
        EmbeddingsDir(f)
    (f / "shard-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(EmbeddingsFormatError, match="not a readable Parquet file"):
        EmbeddingsDir(f)


def test_wrong_dtype_dim_and_mixed_models(tmp_path):
    f = _folder(tmp_path, dtype="float32")
    _edit_manifest(f, dtype="float16")
    with pytest.raises(EmbeddingsFormatError, match=r"is fixed_size_list<element: float>\[8\]; the manifest says "
                                                    r"fixed_size_list<float16>\[8\]"):
        EmbeddingsDir(f)
    _edit_manifest(f, dtype="float32")
    ids, sources, _, x = rows(6, seed=1)
    other = ModelInfo("cd" * 32, 8)
    write_shard(f / "shard-00001.parquet", ids, sources, x, other, dtype="float32")
    with pytest.raises(EmbeddingsFormatError, match="shard-00001.parquet: written by model cdcd.*shards of two runs"):
        EmbeddingsDir(f)


def test_duplicate_ids_nan_and_null_rows(tmp_path):
    ids, sources, _, x = rows(8)
    ids[5] = ids[2]
    e = write_embeddings(tmp_path / "dup", ids, sources, x, MODEL, dtype="float32")
    with pytest.raises(EmbeddingsFormatError, match=f"id '{ids[2]}' appears more than once"):
        e.read_keys()
    ids, sources, _, x = rows(8)
    x[6, 3] = np.nan
    e = write_embeddings(tmp_path / "nan", ids, sources, x, MODEL, dtype="float32", shard_rows=4)
    with pytest.raises(EmbeddingsFormatError, match="shard-00001.parquet: row 2 of 'embedding' has NaN"):
        e.read_embeddings()


def test_writer_refuses_bad_shapes(tmp_path):
    ids, sources, _, x = rows(4)
    with pytest.raises(ValueError, match=r"expected \[4, dim\]"):
        write_shard(tmp_path / "a.parquet", ids, sources, x[:3], MODEL)
    with pytest.raises(ValueError, match="one entry per row"):
        write_shard(tmp_path / "a.parquet", ids, sources[:3], x, MODEL)
    assert not (tmp_path / "a.parquet").exists()
