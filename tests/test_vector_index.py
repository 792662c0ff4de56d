"""FAISS vector indexes (vidlang/index): build / save / load per kind, results against exact search, the id map,
atomic saves (a crash mid-save keeps the old index), model checks, and ``vidlang index build / info``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from vidlang.cli import main
from vidlang.embeddings import ModelInfo, write_embeddings
from vidlang.errors import ConfigError, InputNotFoundError, ModelMismatchError
from vidlang.index import ArraySource, IndexFormatError, VectorIndex, build_index, is_vector_index, load_index

ROOT = Path(__file__).resolve().parents[1]
DIM = 32
MODEL = ModelInfo("5e" * 32, DIM, "/ckpt/tiny.ckpt", "retrieval")
KINDS = {"flat": {}, "hnsw": {}, "ivfpq": {"pq": 16, "k_factor": 16}}
RECALL = {"flat": 1.0, "hnsw": 0.95, "ivfpq": 0.9}  # measured: 1.0, 0.999, 1.0 (2000 x 32, seed 0)


def clustered(n: int = 2000, queries: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around 40 centres, and queries near data points."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal((40, DIM))
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    x = centre[rng.integers(0, 40, n)] + 0.35 * rng.standard_normal((n, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, n, queries)] + 0.1 * rng.standard_normal((queries, DIM))
    return x.astype(np.float32), (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ x.T  # [Q, N]
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, 1), rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An embeddings folder of 2000 rows in 3 shards; ids shuffled against the row order."""
    x, q = clustered()
    rng = np.random.default_rng(1)
    ids = [f"clip{i:05d}" for i in rng.permutation(len(x))]
    sources = [f"videos/{i[4:]}.mp4" for i in ids]
    captions = [f"caption of {i}" for i in ids]
    folder = tmp_path_factory.mktemp("emb")
    write_embeddings(folder, ids, sources, x, MODEL, captions, dtype="float32", shard_rows=700)
    return {"folder": folder, "x": x, "q": q, "ids": ids, "sources": sources, "captions": captions}


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    """Each kind built (one thread: deterministic) and saved."""
    base = tmp_path_factory.mktemp("indexes")
    return {kind: build_index(data["folder"], kind, base / kind, threads=1, **p) for kind, p in KINDS.items()}


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / exact.shape[1] for f, e in zip(found, exact, strict=True)]))


@pytest.mark.parametrize("kind", list(KINDS))
def test_save_load_round_trip(built, data, kind):
    vi = built[kind]
    loaded = VectorIndex.load(vi.path)
    assert (loaded.kind_name, len(loaded), loaded.dim) == (kind, 2000, DIM)
    assert loaded.model == MODEL and loaded.search_params == vi.search_params
    assert loaded.meta["embeddings"]["path"] == str(data["folder"].resolve())
    s0, r0 = vi.search_arrays(data["q"], 10)
    s1, r1 = loaded.search_arrays(data["q"], 10)
    np.testing.assert_array_equal(r0, r1)
    np.testing.assert_allclose(s0, s1, atol=1e-6)
    assert sorted(p.name for p in vi.path.iterdir()) == sorted(["index.json", *vi.meta["files"].values()])
    assert is_vector_index(vi.path) and not is_vector_index(data["folder"])


@pytest.mark.parametrize("kind", list(KINDS))
def test_results_against_exact_search(built, data, kind):
    vi, k = built[kind], 10
    scores, rows = vi.search_arrays(data["q"], k)
    want_scores, want_rows = exact_top(data["x"], data["q"], k)
    r = recall(rows, want_rows)
    assert r >= RECALL[kind], r
    if kind == "flat":  # exact: the same rows in the same order, the same cosines
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # every kind: scores are the true cosines of the rows it returns, best first
    true = np.einsum("qd,qkd->qk", data["q"], data["x"][rows])
    np.testing.assert_allclose(scores, true, atol=1e-2 if kind == "ivfpq" else 1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


@pytest.mark.parametrize("kind", list(KINDS))
def test_id_map_integrity(built, data, kind):
    """Each hit names the id, source and caption of the row it scored, after loading too."""
    vi = VectorIndex.load(built[kind].path)
    picks = [0, 699, 700, 1399, 1400, 1999]  # first / last rows of each shard
    hits = vi.search_hits(data["x"][picks], 3)
    for row, h in zip(picks, hits, strict=True):
        top = h[0]
        assert top.row == row and top.score == pytest.approx(1.0, abs=1e-2)
        assert (top.id, top.source, top.caption) == (data["ids"][row], data["sources"][row], data["captions"][row])
        for hit in h:
            assert (hit.id, hit.source) == (data["ids"][hit.row], data["sources"][hit.row])
    pairs = vi.search_batch(data["x"][picks], 3)
    assert [[p for p, _ in r] for r in pairs] == [[hit.source for hit in h] for h in hits]
    assert vi.search(data["x"][picks[1]], 1) == pairs[1][:1]


def test_search_edge_cases(built, data):
    vi = built["flat"]
    assert len(vi.search_hits(data["q"][:2], 5000)[0]) == 2000  # k > N: every row once
    with pytest.raises(ValueError, match="k must be >= 1"):
        vi.search_arrays(data["q"], 0)
    with pytest.raises(ValueError, match=r"query embeddings must be \[A, 32\]"):
        vi.search_arrays(np.zeros((2, 16), np.float32), 3)
    with pytest.raises(ValueError, match="search takes one query"):
        vi.search(data["q"][:2], 3)
    with pytest.raises(ConfigError, match="query 1 is all zeros"):
        vi.search_arrays(np.stack([data["q"][0], np.zeros(DIM, np.float32)]), 3)
    import torch  # the serving path passes torch tensors (not normalised here: the index normalises)

    t = torch.from_numpy(data["q"][:3] * 5)
    np.testing.assert_array_equal(vi.search_arrays(t, 4)[1], vi.search_arrays(data["q"][:3], 4)[1])


def test_search_params_persist_and_validate(data, built, tmp_path):
    vi = build_index(data["folder"], "hnsw", tmp_path / "h", threads=1, ef_search=12, m=8)
    assert vi.meta["factory"] == "HNSW8" and vi.search_params == {"ef_search": 12}
    assert load_index(tmp_path / "h").search_params == {"ef_search": 12}
    assert load_index(tmp_path / "h", ef_search=200).search_params == {"ef_search": 200}
    with pytest.raises(ConfigError, match="has no search parameter 'nprobe'"):
        load_index(tmp_path / "h", nprobe=3)
    with pytest.raises(ConfigError, match="ef_search must be an integer >= 1"):
        built["hnsw"].set_search_params(ef_search=0)
    with pytest.raises(ConfigError, match="index kind 'ivfpq' needs at least 256 vectors"):
        build_index(ArraySource(data["x"][:100], MODEL), "ivfpq")
    with pytest.raises(ConfigError, match="pq=5 sub-quantizers must divide the embedding dim 32"):
        build_index(ArraySource(data["x"], MODEL), "ivfpq", pq=5)
    with pytest.raises(ConfigError, match="unknown index kind 'annoy'"):
        build_index(ArraySource(data["x"], MODEL), "annoy")
    with pytest.raises(ConfigError, match="takes m, ef_construction, ef_search"):
        build_index(ArraySource(data["x"], MODEL), "hnsw", M=8)


def test_ivfpq_refinement_matters(data):
    """Without re-ranking, 4-bit codes lose recall; k_factor buys it back (the knob is real)."""
    src = ArraySource(data["x"], MODEL)
    want = exact_top(data["x"], data["q"], 10)[1]
    bare = build_index(src, "ivfpq", threads=1, pq=16, refine="none")
    assert bare.meta["factory"] == "IVF32,PQ16x4fs" and "k_factor" not in bare.search_params
    refined = build_index(src, "ivfpq", threads=1, pq=16, k_factor=4)
    low = recall(refined.search_arrays(data["q"], 10)[1], want)
    refined.set_search_params(k_factor=16)
    high = recall(refined.search_arrays(data["q"], 10)[1], want)
    assert recall(bare.search_arrays(data["q"], 10)[1], want) < 0.8 < high and low < high


def test_auto_kind_and_tuned_defaults(data):
    """``auto`` is exact search for small collections and ivfpq for large ones; ivfpq's search defaults are the
    ones measured by `vidlang bench index` (docs/index.md)."""
    from vidlang.index.kinds import AUTO_FLAT_BELOW, INDEX_KINDS, auto_kind

    assert auto_kind(AUTO_FLAT_BELOW - 1) == "flat" and auto_kind(AUTO_FLAT_BELOW) == "ivfpq"
    vi = build_index(ArraySource(data["x"], MODEL), threads=1)
    assert vi.kind_name == "flat" and vi.meta["kind"] == "flat"
    assert INDEX_KINDS.build("ivfpq").search_params() == {"nprobe": 128, "k_factor": 16}


def test_zero_vector_and_duplicate_ids_are_refused(data, tmp_path):
    x = data["x"][:50].copy()
    x[7] = 0
    with pytest.raises(ConfigError, match="row 7 is all zeros"):
        build_index(ArraySource(x, MODEL), "flat")
    with pytest.raises(ConfigError, match="ids must be unique"):
        build_index(ArraySource(data["x"][:3], MODEL, ids=["a", "b", "a"]), "flat")


# -- model identity ----------------------------------------------------------------------------------
class FakeBundle:
    def __init__(self, sha: str, dim: int = DIM) -> None:
        self.checkpoint_sha256, self.embed_dim = sha, dim


def test_mismatched_model_is_refused(built):
    vi = built["flat"]
    vi.check_model(FakeBundle(MODEL.checkpoint_sha256))  # the producing model: fine
    with pytest.raises(ModelMismatchError) as err:
        vi.check_model(FakeBundle("77" * 32), "--ckpt other.ckpt")
    msg = str(err.value)
    assert "\n" not in msg and "5e5e5e5e5e5e" in msg and "--ckpt other.ckpt is sha256 777777777777" in msg
    assert "/ckpt/tiny.ckpt" in msg
    with pytest.raises(ModelMismatchError, match="holds 32-d embeddings, but the model makes 64-d ones"):
        vi.check_model(FakeBundle(MODEL.checkpoint_sha256, 64))
    with pytest.raises(ModelMismatchError, match="of unknown origin"):
        vi.check_model(FakeBundle(""))
    with pytest.raises(ModelMismatchError):
        load_index(vi.path, model=FakeBundle("77" * 32))


# -- atomic saves --------------------------------------------------------------------------------------
CRASH = """
import os, sys
import numpy as np
import faiss
import vidlang.io
from vidlang.index import load_index
vi = load_index(sys.argv[1])
vi.index.reset()  # a different index: empty
point = sys.argv[2]
if point == "commit":  # both data files written, killed before index.json is replaced
    vidlang.io.atomic_write_text = lambda *a, **k: os._exit(9)
else:  # killed while writing the FAISS file (half of it on disk)
    real = faiss.write_index
    def half(index, path):
        real(index, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os._exit(9)
    faiss.write_index = half
vi.save(sys.argv[1])
"""


@pytest.mark.parametrize("point", ["commit", "faiss-file"])
def test_crash_mid_save_keeps_the_old_index(data, tmp_path, point):
    vi = build_index(data["folder"], "hnsw", tmp_path / "idx", threads=1, m=8)
    before = sorted(p.name for p in (tmp_path / "idx").iterdir())
    want = vi.search_arrays(data["q"], 5)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CRASH), str(tmp_path / "idx"), point],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 9, proc.stderr
    after = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert set(before) < set(after)  # the crash left files (new generation or a temporary file) ...
    old = load_index(tmp_path / "idx")  # ... but index.json still names the old, whole index
    assert len(old) == 2000
    got = old.search_arrays(data["q"], 5)
    np.testing.assert_array_equal(got[1], want[1])
    old.save(tmp_path / "idx")  # the next save removes the leftovers
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == sorted(["index.json", *old.meta["files"].values()])
    np.testing.assert_array_equal(load_index(tmp_path / "idx").search_arrays(data["q"], 5)[1], want[1])


def test_failed_save_raises_and_keeps_the_old_index(data, tmp_path, monkeypatch):
    import vidlang.io

    vi = build_index(data["folder"], "flat", tmp_path / "idx")
    meta = (tmp_path / "idx" / "index.json").read_text()

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vidlang.io, "atomic_write_text", fail)
    with pytest.raises(OSError, match="No space left"):
        vi.save(tmp_path / "idx")
    assert (tmp_path / "idx" / "index.json").read_text() == meta
    assert len(load_index(tmp_path / "idx")) == 2000


def test_damaged_index_is_refused(data, tmp_path):
    vi = build_index(data["folder"], "flat", tmp_path / "idx")
    with pytest.raises(InputNotFoundError, match="no index.json: not a vector index"):
        load_index(tmp_path)
    faiss_file = tmp_path / "idx" / vi.meta["files"]["index"]
    faiss_file.write_bytes(faiss_file.read_bytes()[:1000])
    with pytest.raises(IndexFormatError, match="truncated or replaced"):
        load_index(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    meta["sizes"]["index"] = 1000
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match="unreadable index files"):
        load_index(tmp_path / "idx")
    (tmp_path / "idx" / "index.json").write_text(json.dumps({**meta, "version": 7}))
    with pytest.raises(IndexFormatError, match="format version 7"):
        load_index(tmp_path / "idx")


# -- the command line --------------------------------------------------------------------------------
def test_index_build_and_info_commands(data, tmp_path, capsys):
    out = tmp_path / "idx"
    rc = main(["index", "build", "--embeddings", str(data["folder"]), "--out", str(out), "--kind", "hnsw",
               "--param", "m=8", "--param", "ef_search=20", "--threads", "1", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0 and "built hnsw index (HNSW8) of 2000 x 32" in text and "{'ef_search': 20}" in text
    assert load_index(out).search_params == {"ef_search": 20}
    assert main(["index", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "hnsw (HNSW8), 2000 x 32" in text and "/ckpt/tiny.ckpt" in text and str(data["folder"]) in text
    rc = main(["index", "build", "--embeddings", str(data["folder"]), "--out", str(out), "--kind", "flat"])
    assert rc == 0 and load_index(out).kind_name == "flat"  # an index there is replaced


@pytest.mark.parametrize("args, message", [
    (["--param", "m"], "--param 'm': expected NAME=VALUE"),
    (["--kind", "hnsw", "--param", "nlist=4"], "index kind 'hnsw': .* takes m, ef_construction, ef_search"),
    (["--param", "nlist=4"], "index kind 'flat': .* 'nlist'; it takes no arguments"),  # auto: 2000 -> flat
    (["--gpu", "on"], "the installed FAISS has no GPU support"),
    (["--out", "{emb}"], "exists and is not a vector index"),
    (["--embeddings", "{missing}"], "no such embeddings folder"),
])
def test_index_build_errors_are_one_line(data, tmp_path, capsys, args, message):
    import re

    base = {"--embeddings": str(data["folder"]), "--out": str(tmp_path / "idx")}
    fill = {"emb": str(data["folder"]), "missing": str(tmp_path / "missing")}
    extra = [a.format(**fill) for a in args]
    for flag in ("--embeddings", "--out"):
        if flag in extra:
            base.pop(flag)
    argv = ["index", "build", *[x for kv in base.items() for x in kv], "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(message, err), err


# -- the benchmark -----------------------------------------------------------------------------------
def test_bench_index_small_run(capsys):
    """`vidlang bench index` end to end on a small collection: a row per kind and setting, exact search at
    recall 1.0, and the measured recall of the graph index close to the exact one."""
    rc = main(["bench", "index", "--n", "3000", "--dim", "32", "--centres", "30", "--queries", "50",
               "--latency-queries", "20", "--kinds", "flat,hnsw", "--sweep", "hnsw.ef_search=8,64",
               "--param", "hnsw.m=8", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in out.splitlines()
            if ln.startswith("| flat") or ln.startswith("| hnsw")]
    assert [r[:3] for r in rows] == [["flat", "Flat", "-"], ["hnsw", "HNSW8", "ef_search=8"],
                                     ["hnsw", "HNSW8", "ef_search=64"]]
    recall = [float(r[-1]) for r in rows]
    assert recall[0] == 1.0 and recall[2] >= 0.95 and recall[1] <= recall[2]
    assert all(float(r[6]) > 0 and float(r[7]) >= float(r[6]) for r in rows)  # p95 >= p50 > 0
    assert "load average before" in out and "after" in out


def test_bench_synthetic_vectors_are_seeded_unit_rows():
    from vidlang.bench.index import recall_at_k, synthetic_vectors

    x, q = synthetic_vectors(500, 16, 10, 20, seed=3)
    x2, q2 = synthetic_vectors(500, 16, 10, 20, seed=3)
    assert x.shape == (500, 16) and q.shape == (20, 16) and np.array_equal(x, x2) and np.array_equal(q, q2)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert not np.array_equal(x, synthetic_vectors(500, 16, 10, 20, seed=4)[0])
    assert recall_at_k(np.array([[1, 2, -1]]), np.array([[2, 1, 3]])) == pytest.approx(2 / 3)
