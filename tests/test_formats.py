"""Every format reader: a fixture in the exact layout, read back; malformed rows name file and line."""

from __future__ import annotations

import csv
import json
import os
import pickle
import tarfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from vidlang.commands.shards import write_shards
from vidlang.data.formats import FORMATS, FormatError, build_index
from vidlang.data.formats.howtocaption import safe_load_pickle
from vidlang.data.formats.webvid import parse_iso_duration
from vidlang.data.sample import TarMember


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from vidlang.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(out, 8, seed=1, size=48, frames=16, workers=1, progress=False)
    return out


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_registry_lists_all_formats():
    assert {"manifest", "webvid", "howtocaption", "webdataset", "kinetics", "ucf101", "hmdb51", "msrvtt",
            "ssv2"} <= set(FORMATS.names())


@pytest.mark.parametrize("name", ["manifest.csv", "manifest.jsonl"])
def test_manifest_csv_and_jsonl(corpus, name):
    index = build_index("manifest", path=str(corpus / name))
    rows = [json.loads(ln) for ln in (corpus / "manifest.jsonl").read_text().splitlines()]
    assert len(index) == len(rows) == 8
    e = index.entries[0]
    assert e.key == str(rows[0]["key"]) and e.captions == rows[0]["captions"] and e.label == rows[0]["label"]
    assert Path(e.path) == corpus / rows[0]["path"] and Path(e.path).is_file()
    assert index.classes == (corpus / "classes.txt").read_text().split("\n")[:-1]
    train = build_index("manifest", path=str(corpus / name), split="train")
    assert len(train) == sum(r["split"] == "train" for r in rows)


def test_manifest_errors_name_file_and_line(tmp_path):
    rows = [["a.mp4", '["x"]', "1"], ["b.mp4", "[oops", ""]]
    bad = write_csv(tmp_path / "m.csv", ["path", "captions", "label"], rows)
    with pytest.raises(FormatError, match=r"m\.csv:3: column 'captions'"):
        build_index("manifest", path=str(bad))
    nolabel = write_csv(tmp_path / "n.csv", ["path", "label"], [["a.mp4", "x"]])
    with pytest.raises(FormatError, match=r"n\.csv:2: column 'label'"):
        build_index("manifest", path=str(nolabel))
    missing = write_csv(tmp_path / "o.csv", ["video", "caption"], [["a.mp4", "x"]])
    with pytest.raises(FormatError, match=r"o\.csv:1: missing column"):
        build_index("manifest", path=str(missing))
    (tmp_path / "p.jsonl").write_text('{"path": "a.mp4", "caption": "x"}\nnot json\n')
    with pytest.raises(FormatError, match=r"p\.jsonl:2: invalid JSON"):
        build_index("manifest", path=str(tmp_path / "p.jsonl"))


def test_webvid(corpus):
    index = build_index("webvid", csv=str(corpus / "webvid_train.csv"))
    with open(corpus / "webvid_train.csv") as f:
        rows = list(csv.DictReader(f))
    assert [e.key for e in index.entries] == [r["videoid"] for r in rows]
    e, r = index.entries[0], rows[0]
    assert Path(e.path) == corpus / r["page_dir"] / f"{r['videoid']}.mp4" and Path(e.path).is_file()
    assert e.captions == [r["name"]] and e.meta["duration"] == parse_iso_duration(r["duration"])


def test_iso_duration_and_bad_webvid_row(tmp_path):
    assert parse_iso_duration("PT00H00M17S") == 17
    assert parse_iso_duration("PT1H2M3.5S") == 3723.5
    with pytest.raises(ValueError):
        parse_iso_duration("17 seconds")
    bad = write_csv(tmp_path / "w.csv", ["videoid", "contentUrl", "duration", "page_dir", "name"],
                    [["1", "u", "PT00H00M05S", "d", "ok"], ["2", "u", "5s", "d", "bad"]])
    with pytest.raises(FormatError, match=r"w\.csv:3: column 'duration'"):
        build_index("webvid", csv=str(bad))


def howtocaption_fixture(tmp_path: Path, corpus: Path) -> tuple[list[str], Path]:
    videos = sorted(str(p.relative_to(corpus)) for p in corpus.glob("videos/*/*.mp4"))[:2]
    ids = ["vidA", "vidB"]
    rows = [[i, v] for i, v in zip(ids, videos, strict=True)]
    vcsv = write_csv(tmp_path / "videos.csv", ["video_id", "video_path"], rows)
    return ids, vcsv


def test_howtocaption_pickle_filtered_and_unfiltered(tmp_path, corpus):
    ids, vcsv = howtocaption_fixture(tmp_path, corpus)
    ann = {"vidA": {"start": [1.0, 0.0], "end": [1.5, 0.8], "text": [["second a", "second b"], ["first"]]},
           "vidB": {"start": [0.2], "end": [1.2], "text": [["only"]]}, "vidMissing": {"start": [0], "end": [1],
                                                                               "text": [["x"]]}}
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(ann))
    index = build_index("howtocaption", annotations=str(tmp_path / "a.pkl"), video_csv=str(vcsv),
                        video_root=str(corpus))
    assert [(e.window, e.captions) for e in index.entries] == [
        ((0.0, 0.8), ["first"]), ((1.0, 1.5), ["second a", "second b"]), ((0.2, 1.2), ["only"])]
    assert all(e.eval_captions == "first" and Path(e.path).is_file() for e in index.entries)
    assert "missing_videos=1" in index.description
    unfiltered = {"vidA": {"start": [0.0], "end": [1.0], "text": [[("cap one", 0.9), ("cap two", 0.4)]]}}
    (tmp_path / "u.pkl").write_bytes(pickle.dumps(unfiltered))
    e = build_index("howtocaption", annotations=str(tmp_path / "u.pkl"), video_csv=str(vcsv),
                    video_root=str(corpus)).entries[0]
    assert e.captions == ["cap one", "cap two"] and e.meta["scores"] == [0.9, 0.4]


def test_howtocaption_pickle_refuses_non_builtins(tmp_path):
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"v": OrderedDict(start=[0], end=[1], text=[["x"]])}))
    with pytest.raises(FormatError, match="refusing to load collections.OrderedDict"):
        safe_load_pickle(tmp_path / "evil.pkl")
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps({"v": {"start": [0, 1], "end": [1], "text": [["x"]]}}))
    with pytest.raises(FormatError, match="lengths differ"):
        build_index("howtocaption", annotations=str(tmp_path / "bad.pkl"), video_csv=str(tmp_path / "bad.pkl"))


def test_howtocaption_parquet(tmp_path, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, vcsv = howtocaption_fixture(tmp_path, corpus)
    desc_type = pa.list_(pa.struct([("start", pa.float64()), ("end", pa.float64()), ("text", pa.list_(pa.string()))]))
    table = pa.table({"video_id": ids, "description": pa.array(
        [[{"start": 0.5, "end": 1.5, "text": ["a1", "a2"]}], [{"start": 0.0, "end": 1.0, "text": ["b1"]}]],
        type=desc_type)})
    pq.write_table(table, tmp_path / "h.parquet")
    index = build_index("howtocaption", annotations=str(tmp_path / "h.parquet"), video_csv=str(vcsv),
                        video_root=str(corpus))
    assert [(e.key, e.window, e.captions) for e in index.entries] == [
        ("vidA_0000", (0.5, 1.5), ["a1", "a2"]), ("vidB_0000", (0.0, 1.0), ["b1"])]


def test_webdataset_shards_round_trip(tmp_path, corpus):
    index = build_index("manifest", path=str(corpus / "manifest.csv"))
    before = set(os.listdir(corpus))
    stats = write_shards(index, tmp_path / "shards", samples_per_shard=3, progress=False)
    assert stats["samples"] == 8 and stats["shards"] == 3
    names = tarfile.open(tmp_path / "shards" / "00000.tar").getnames()
    assert names[:3] == ["000000000.mp4", "000000000.txt", "000000000.json"]
    assert json.loads((tmp_path / "shards" / "00002_stats.json").read_text())["successes"] == 2
    back = build_index("webdataset", shards=str(tmp_path / "shards"), classes=str(tmp_path / "shards/classes.txt"))
    assert len(back) == 8 and back.classes == index.classes
    for src, e in zip(index.entries, back.entries, strict=True):
        assert isinstance(e.source, TarMember) and len(e.key) == 9
        assert (e.captions, e.label, e.meta["source_key"]) == (src.captions, src.label, src.key)
        assert e.open_source() == Path(src.path).read_bytes()  # bytes read by seeking, nothing extracted
    assert set(os.listdir(corpus)) == before and sorted(os.listdir(tmp_path / "shards")) == sorted(
        ["00000.tar", "00001.tar", "00002.tar", "00000_stats.json", "00001_stats.json", "00002_stats.json",
         "classes.txt", "stats.json"])
    from vidlang.data.decoding import open_video

    with open_video(back.entries[0].open_source(), backend="pyav") as r:
        assert r.get_frames([0]).shape[0] == 1


def test_shards_command_and_brace_pattern(tmp_path, corpus):
    from vidlang.cli import main

    out = tmp_path / "s"
    assert main(["shards", "--format", "webvid", "--input", str(corpus / "webvid_train.csv"), "--out", str(out),
                 "--samples-per-shard", "4"]) == 0
    n = len(build_index("webvid", csv=str(corpus / "webvid_train.csv")))
    shards = sorted(out.glob("*.tar"))
    assert len(shards) == 2
    back = build_index("webdataset", shards=str(out) + f"/{{00000..{len(shards) - 1:05d}}}.tar")
    assert len(back) == n


def test_kinetics_csv_and_list(tmp_path):
    rows = [["abseiling", "yt1", "10", "20", "train"], ["zumba", "yt2", "0", "10", "train"],
            ["abseiling", "yt3", "5", "15", "val"]]
    kcsv = write_csv(tmp_path / "k.csv", ["label", "youtube_id", "time_start", "time_end", "split"], rows)
    index = build_index("kinetics", csv=str(kcsv), video_root="/data/k400", split="train")
    assert index.classes == ["abseiling", "zumba"]
    assert [(e.path, e.label) for e in index.entries] == [
        ("/data/k400/yt1_000010_000020.mp4", 0), ("/data/k400/yt2_000000_000010.mp4", 1)]
    sub = build_index("kinetics", csv=str(kcsv), video_root="/d", split="val", class_subdirs=True)
    assert sub.entries[0].path == "/d/abseiling/yt3_000005_000015.mp4"
    (tmp_path / "classes.txt").write_text("abseiling\nzumba\n")
    (tmp_path / "list.txt").write_text("a/x.mp4 1\nb/y.mp4 0\n")
    lst = build_index("kinetics", list_file=str(tmp_path / "list.txt"), classes=str(tmp_path / "classes.txt"),
                      video_root="/r")
    assert [(e.path, e.label) for e in lst.entries] == [("/r/a/x.mp4", 1), ("/r/b/y.mp4", 0)]
    (tmp_path / "bad.txt").write_text("a/x.mp4 1\nb/y.mp4 7\n")
    with pytest.raises(FormatError, match=r"bad\.txt:2: label 7"):
        build_index("kinetics", list_file=str(tmp_path / "bad.txt"), classes=str(tmp_path / "classes.txt"))


def test_ucf101(tmp_path):
    d = tmp_path / "ucfTrainTestlist"
    d.mkdir()
    (d / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n")
    (d / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nArchery/v_Archery_g01_c01.avi 2\n")
    (d / "testlist01.txt").write_text("Archery/v_Archery_g05_c02.avi\n")
    train = build_index("ucf101", split_dir=str(d), video_root="/ucf", fold=1, split="train")
    assert train.classes == ["ApplyEyeMakeup", "Archery"]
    assert [(e.path, e.label) for e in train.entries] == [
        ("/ucf/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 0), ("/ucf/Archery/v_Archery_g01_c01.avi", 1)]
    test = build_index("ucf101", split_dir=str(d), video_root="/ucf", split="test")
    assert [(e.key, e.label) for e in test.entries] == [("v_Archery_g05_c02", 1)]
    (d / "trainlist02.txt").write_text("Archery/v_Archery_g01_c01.avi 1\n")
    with pytest.raises(FormatError, match=r"trainlist02\.txt:1: label 1 disagrees"):
        build_index("ucf101", split_dir=str(d), video_root="/ucf", fold=2)


def test_hmdb51(tmp_path):
    (tmp_path / "brush_hair_test_split1.txt").write_text("a.avi 1\nb.avi 2\nc.avi 0\n")
    (tmp_path / "cartwheel_test_split1.txt").write_text("d.avi 2\n")
    train = build_index("hmdb51", split_dir=str(tmp_path), video_root="/h", split="train")
    test = build_index("hmdb51", split_dir=str(tmp_path), video_root="/h", split="test")
    assert train.classes == ["brush_hair", "cartwheel"]
    assert [(e.path, e.label) for e in train.entries] == [("/h/brush_hair/a.avi", 0)]
    assert [(e.path, e.label) for e in test.entries] == [("/h/brush_hair/b.avi", 0), ("/h/cartwheel/d.avi", 1)]
    (tmp_path / "cartwheel_test_split2.txt").write_text("d.avi 5\n")
    with pytest.raises(FormatError, match=r"cartwheel_test_split2\.txt:1"):
        build_index("hmdb51", split_dir=str(tmp_path), video_root="/h", fold=2)


def test_ssv2(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"Pushing something from left to right": "1",
                                                      "Approaching something with your camera": "0"}))
    (tmp_path / "train.json").write_text(json.dumps([
        {"id": "7", "template": "Pushing [something] from left to right", "placeholders": ["a cup"]},
        {"id": "9", "template": "Approaching [something] with your camera", "placeholders": ["x"]}]))
    index = build_index("ssv2", labels=str(tmp_path / "labels.json"), list_json=str(tmp_path / "train.json"),
                        video_root="/s")
    assert index.classes[1] == "Pushing something from left to right"
    assert [(e.path, e.label) for e in index.entries] == [("/s/7.webm", 1), ("/s/9.webm", 0)]


def test_msrvtt_test_and_train(tmp_path):
    tcsv = write_csv(tmp_path / "MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"],
                     [["ret0", "msr7020", "video7020", "a man is cooking"], ["ret1", "msr7021", "video7021", "dogs"]])
    test = build_index("msrvtt", csv=str(tcsv), video_root="/m")
    assert [(e.path, e.captions) for e in test.entries] == [("/m/video7020.mp4", ["a man is cooking"]),
                                                            ("/m/video7021.mp4", ["dogs"])]
    train_csv = write_csv(tmp_path / "MSRVTT_train.9k.csv", ["video_id"], [["video0"], ["video1"]])
    data = {"sentences": [{"video_id": "video0", "caption": "c0a", "sen_id": 0},
                          {"video_id": "video1", "caption": "c1a", "sen_id": 1},
                          {"video_id": "video0", "caption": "c0b", "sen_id": 2}]}
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(data))
    train = build_index("msrvtt", csv=str(train_csv), data_json=str(tmp_path / "MSRVTT_data.json"), video_root="/m")
    assert [(e.key, e.captions) for e in train.entries] == [("video0", ["c0a", "c0b"]), ("video1", ["c1a"])]
    write_csv(train_csv, ["video_id"], [["video0"], ["video9"]])
    with pytest.raises(FormatError, match=r"MSRVTT_train\.9k\.csv:3: video 'video9' has no caption"):
        build_index("msrvtt", csv=str(train_csv), data_json=str(tmp_path / "MSRVTT_data.json"), video_root="/m")


def test_formats_feed_the_dataset(corpus):
    from vidlang.data.datasets import VideoTextDataset
    from vidlang.data.sampling import build_sampler

    index = build_index("webvid", csv=str(corpus / "webvid_train.csv"))
    ds = VideoTextDataset(index.entries, build_sampler("segment", num_frames=4), backend="pyav")
    s = ds[0]
    assert s.video.shape == (1, 4, 3, 48, 48) and s.video.dtype == torch.uint8
    assert s.captions == index.entries[0].captions


def test_howtocaption_caption_choice_random_in_training_first_in_eval(tmp_path, corpus):
    from vidlang.data.datasets import VideoTextDataset
    from vidlang.data.sampling import build_sampler

    ids, vcsv = howtocaption_fixture(tmp_path, corpus)
    caps = ["c0", "c1", "c2", "c3"]
    (tmp_path / "a.pkl").write_bytes(pickle.dumps({"vidA": {"start": [0.5], "end": [1.5], "text": [caps]}}))
    entries = build_index("howtocaption", annotations=str(tmp_path / "a.pkl"), video_csv=str(vcsv),
                          video_root=str(corpus)).entries
    sampler = build_sampler("segment", num_frames=2)
    assert VideoTextDataset(entries, sampler, backend="pyav")[0].captions == ["c0"]
    train = VideoTextDataset(entries, sampler, training=True, backend="pyav")
    chosen = []
    for epoch in range(8):
        train.set_epoch(epoch)
        sample = train[0]
        assert len(sample.captions) == 1 and sample.window == (0.5, 1.5)
        chosen.append(sample.captions[0])
    assert set(chosen) <= set(caps) and len(set(chosen)) > 1
