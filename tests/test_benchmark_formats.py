"""Readers of the retrieval / recognition benchmarks papers report (MSVD, DiDeMo, ActivityNet Captions, LSMDC, VATEX,
Charades) and the ViFi-CLIP / K600 presets: tiny fakes in each exact file layout; malformed input names file:line."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from vidlang.data.formats import FORMATS, FormatError, build_index
from vidlang.data.formats.base import read_class_names, read_json_items
from vidlang.data.formats.lsmdc import movie_of
from vidlang.data.formats.presets import PRESETS, expand_preset


def test_new_formats_are_registered():
    assert {"msvd", "didemo", "activitynet", "lsmdc", "vatex", "charades", "preset"} <= set(FORMATS.names())


# ---------------------------------------------------------------- MSVD


def _msvd(tmp_path: Path) -> Path:
    d = tmp_path / "msvd_data"
    d.mkdir()
    caps = {
        "-4wsuPCjDBc_5_15": [["a", "squirrel", "is", "eating"], ["a", "squirrel", "eats", "a", "nut"]],
        "-7KMZQEsJW4_205_208": [["a", "man", "plays", "guitar"], "a man is playing a guitar"],
        "unused_1_2": [["not", "listed"]],
    }
    with open(d / "raw-captions.pkl", "wb") as f:
        pickle.dump(caps, f)
    (d / "test_list.txt").write_text("-4wsuPCjDBc_5_15\n-7KMZQEsJW4_205_208\n")
    (d / "train_list.txt").write_text("unused_1_2\n")
    return d


def test_msvd_multi_caption_entries_and_official_counts(tmp_path):
    d = _msvd(tmp_path)
    index = build_index("msvd", data_dir=str(d), split="test", video_root=str(tmp_path / "YouTubeClips"))
    assert [e.key for e in index.entries] == ["-4wsuPCjDBc_5_15", "-7KMZQEsJW4_205_208"]
    assert index.entries[0].captions == ["a squirrel is eating", "a squirrel eats a nut"]
    assert index.entries[1].captions == ["a man plays guitar", "a man is playing a guitar"]  # tokens or strings
    assert index.entries[0].path == str(tmp_path / "YouTubeClips" / "-4wsuPCjDBc_5_15.avi")
    assert (index.official.videos, index.official.captions) == (670, 27763)
    assert build_index("msvd", data_dir=str(d), split="train").official.videos == 1200


def test_msvd_errors(tmp_path):
    d = _msvd(tmp_path)
    (d / "val_list.txt").write_text("-4wsuPCjDBc_5_15\nno_such_video\n")
    with pytest.raises(FormatError, match=r"val_list\.txt:2: video 'no_such_video' has no caption"):
        build_index("msvd", data_dir=str(d), split="val")
    (d / "val_list.txt").write_text("-4wsuPCjDBc_5_15\n\n-4wsuPCjDBc_5_15\n")
    with pytest.raises(FormatError, match=r"val_list\.txt:3: id '-4wsuPCjDBc_5_15' repeats line 1"):
        build_index("msvd", data_dir=str(d), split="val")
    with open(d / "raw-captions.pkl", "wb") as f:
        pickle.dump({"-4wsuPCjDBc_5_15": [["a"], ["  "]]}, f)
    (d / "val_list.txt").write_text("-4wsuPCjDBc_5_15\n")
    with pytest.raises(FormatError, match=r"raw-captions\.pkl: video '-4wsuPCjDBc_5_15' caption 1: blank"):
        build_index("msvd", data_dir=str(d), split="val")


# ---------------------------------------------------------------- DiDeMo


def _didemo_items() -> list[dict]:
    return [
        {"annotation_id": 1, "description": "a girl jumps", "video": "111@N00_222_aaa.mov",
         "times": [[1, 1], [1, 2], [1, 1], [1, 2]], "dl_link": "http://x", "num_segments": 6},
        {"annotation_id": 2, "description": "the camera pans ", "video": "333@N01_444_bbb.mp4",
         "times": [[0, 0]], "dl_link": "http://y", "num_segments": 6},
        {"annotation_id": 3, "description": "she lands", "video": "111@N00_222_aaa.mov",
         "times": [[3, 4]], "dl_link": "http://x", "num_segments": 6},
    ]


def test_didemo_paragraphs_in_file_order_and_moments(tmp_path):
    p = tmp_path / "test_data.json"
    p.write_text(json.dumps(_didemo_items(), indent=1))
    index = build_index("didemo", data_json=str(p), video_root=str(tmp_path / "videos"))
    assert [e.key for e in index.entries] == ["111@N00_222_aaa.mov", "333@N01_444_bbb.mp4"]
    assert index.entries[0].captions == ["a girl jumps she lands"]  # joined in file order, one space
    assert index.entries[1].captions == ["the camera pans"]
    assert index.entries[0].window is None and index.entries[0].path == str(tmp_path / "videos/111@N00_222_aaa.mov")
    assert (index.official.videos, index.official.captions) == (1004, 1004)
    mp4 = build_index("didemo", data_json=str(p), video_root="v", ext="mp4")
    assert mp4.entries[0].path == str(Path("v/111@N00_222_aaa.mp4"))
    moments = build_index("didemo", data_json=str(p), paragraph=False)
    assert [e.captions[0] for e in moments.entries] == ["a girl jumps", "she lands", "the camera pans"]
    assert moments.entries[0].window == (5.0, pytest.approx(12.5))  # chunks (1,1,1,1) / (1,2,1,2): 5 .. 2.5 chunks
    assert moments.entries[1].window == (15.0, 25.0) and moments.official is None


def test_didemo_id_list_and_errors(tmp_path):
    p = tmp_path / "val_data.json"
    p.write_text(json.dumps(_didemo_items(), indent=1))
    ids = tmp_path / "val_list.txt"
    ids.write_text("333@N01_444_bbb.mp4\n")
    index = build_index("didemo", data_json=str(p), ids=str(ids))
    assert [e.key for e in index.entries] == ["333@N01_444_bbb.mp4"] and index.official.videos == 1065
    ids.write_text("333@N01_444_bbb.mp4\nmissing.mov\n")
    with pytest.raises(FormatError, match=r"val_list\.txt:2: video 'missing\.mov' has no description"):
        build_index("didemo", data_json=str(p), ids=str(ids))
    items = _didemo_items()
    items[2]["description"] = " "
    p.write_text(json.dumps(items, indent=1))
    line = next(n for n, text in enumerate(p.read_text().splitlines(), 1) if '"annotation_id": 3' in text) - 1
    with pytest.raises(FormatError, match=rf"val_data\.json:{line}: item 2 .*blank or missing 'description'"):
        build_index("didemo", data_json=str(p))
    p.write_text('[{"video": "a.mov", "description": "x",}]')
    with pytest.raises(FormatError, match=r"val_data\.json:1: invalid JSON"):
        build_index("didemo", data_json=str(p))


def test_json_items_give_the_line_of_each_item(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{\n  "a": {"x": 1},\n\n  "b": [1,\n 2],\n  "c": "s"\n}\n')
    kind, items = read_json_items(p, "x")
    assert kind == "dict" and [(n, k) for n, k, _ in items] == [(2, "a"), (4, "b"), (6, "c")]
    p.write_text('{"a": 1, "a": 2}')
    with pytest.raises(FormatError, match=r"x\.json:1: key 'a' repeats line 1"):
        read_json_items(p, "x")
    p.write_text("[]")
    assert read_json_items(p, "x") == ("list", [])


# ---------------------------------------------------------------- ActivityNet Captions


def _anet() -> dict:
    return {
        "v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81]],
                          "sentences": ["A young woman is seen standing.", " She then dances."]},
        "v_ehGHCYKzyZ8": {"duration": 61.72, "timestamps": [[0, 10.5]], "sentences": ["A man rides a bike."]},
    }


def test_activitynet_paragraphs_and_sentences(tmp_path):
    p = tmp_path / "val_1.json"
    p.write_text(json.dumps(_anet(), indent=2))
    index = build_index("activitynet", captions_json=str(p), video_root="anet")
    e = index.entries[0]
    assert e.key == "v_QOlSCBRmfWY" and e.captions == ["A young woman is seen standing. She then dances."]
    assert e.path == str(Path("anet/v_QOlSCBRmfWY.mp4")) and e.meta["duration"] == 82.73 and e.window is None
    assert (index.official.videos, index.official.captions) == (4917, 4917)
    c4c = build_index("activitynet", captions_json=str(p), video_root="anet", file_prefix="")
    assert c4c.entries[0].path == str(Path("anet/QOlSCBRmfWY.mp4"))  # CLIP4Clip's layout (no v_ prefix)
    sentences = build_index("activitynet", captions_json=str(p), paragraph=False)
    assert [x.window for x in sentences.entries] == [(0.83, 19.86), (17.37, 60.81), (0.0, 10.5)]
    assert (sentences.official.videos, sentences.official.captions) == (4917, 17505)
    ids = tmp_path / "val_ids.json"
    ids.write_text(json.dumps(["v_ehGHCYKzyZ8"]))
    assert [x.key for x in build_index("activitynet", captions_json=str(p), ids_json=str(ids)).entries] == [
        "v_ehGHCYKzyZ8"]


def test_activitynet_errors_name_the_line(tmp_path):
    ann = _anet()
    ann["v_ehGHCYKzyZ8"]["timestamps"] = [[0, 10.5], [11, 12]]
    p = tmp_path / "train.json"
    p.write_text(json.dumps(ann, indent=2))
    line = next(n for n, t in enumerate(p.read_text().splitlines(), 1) if "v_ehGHCYKzyZ8" in t)
    with pytest.raises(FormatError, match=rf"train\.json:{line}: video 'v_ehGHCYKzyZ8': 1 sentences but 2"):
        build_index("activitynet", captions_json=str(p))
    ann = _anet()
    ann["v_ehGHCYKzyZ8"]["duration"] = "long"
    p.write_text(json.dumps(ann, indent=2))
    with pytest.raises(FormatError, match=rf"train\.json:{line}: .*'duration' must be a positive number"):
        build_index("activitynet", captions_json=str(p))
    ids = tmp_path / "ids.json"
    ids.write_text('[\n"v_QOlSCBRmfWY",\n"v_nope"\n]')
    p.write_text(json.dumps(_anet()))
    with pytest.raises(FormatError, match=r"ids\.json:3: video 'v_nope' has no annotation"):
        build_index("activitynet", captions_json=str(p), ids_json=str(ids))


# ---------------------------------------------------------------- LSMDC


def test_lsmdc_tab_separated_clips(tmp_path):
    clip_a = "0001_American_Beauty_00.00.51.926-00.00.54.129"
    clip_b = "3001_21_JUMP_STREET_00.00.01.490-00.00.05.640"
    rows = [
        f"{clip_a}\t00.00.51.926\t00.00.54.129\t00.00.51.406\t00.00.54.129\tSomeone opens the door.",
        f"{clip_b}\t00.00.01.490\t00.00.05.640\t00.00.01.000\t00.00.05.640\tSomeone runs.",
        f"{clip_a}\t00.00.51.926\t00.00.54.129\t00.00.51.406\t00.00.54.129\tHe steps in.",
    ]
    p = tmp_path / "LSMDC16_challenge_1000_publictect.csv"
    p.write_text("\n".join(rows) + "\n")
    index = build_index("lsmdc", annotations=str(p), video_root="lsmdc")
    assert [e.key for e in index.entries] == [clip_a, clip_b]
    assert index.entries[0].captions == ["Someone opens the door.", "He steps in."]
    assert index.entries[1].path == str(Path(f"lsmdc/3001_21_JUMP_STREET/{clip_b}.avi"))
    assert movie_of(clip_b) == "3001_21_JUMP_STREET" and movie_of("odd_name") == "odd"
    assert (index.official.videos, index.official.captions) == (1000, 1000)
    flat = build_index("lsmdc", annotations=str(p), video_root="lsmdc", layout="flat", ext="mp4")
    assert flat.entries[0].path == str(Path(f"lsmdc/{clip_a}.mp4"))
    p.write_text(rows[0] + "\n" + rows[1].replace("\tSomeone runs.", "") + "\n")
    with pytest.raises(FormatError, match=r"publictect\.csv:2: expected 6 tab-separated fields"):
        build_index("lsmdc", annotations=str(p))


# ---------------------------------------------------------------- VATEX


def test_vatex_official_list_and_clip2video_dict(tmp_path):
    items = [
        {"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": [f"cap {i}" for i in range(10)], "chCap": ["中"] * 10},
        {"videoID": "abc_000001_000011", "enCap": ["x " * 3] + ["y"] * 9, "chCap": ["文"] * 10},
    ]
    p = tmp_path / "vatex_validation_v1.0.json"
    p.write_text(json.dumps(items, indent=1, ensure_ascii=False))
    ids = tmp_path / "test_list.txt"
    ids.write_text("abc_000001_000011\n")
    index = build_index("vatex", annotations=str(p), ids=str(ids), split="test", video_root="vx")
    assert [e.key for e in index.entries] == ["abc_000001_000011"] and index.entries[0].captions[0] == "x x x"
    assert index.entries[0].path == str(Path("vx/abc_000001_000011.mp4"))
    assert (index.official.videos, index.official.captions) == (1500, 15000)
    assert build_index("vatex", annotations=str(p), language="zh").entries[0].captions == ["中"] * 10
    d = tmp_path / "vatex_data.json"
    d.write_text(json.dumps({it["videoID"]: {"enCap": it["enCap"]} for it in items}))
    assert [e.key for e in build_index("vatex", annotations=str(d)).entries] == [it["videoID"] for it in items]
    items[1]["enCap"] = []
    p.write_text(json.dumps(items, indent=1))
    line = next(n for n, t in enumerate(p.read_text().splitlines(), 1) if t.strip() == "{" and n > 2)
    with pytest.raises(FormatError, match=rf"vatex_validation_v1\.0\.json:{line}: video 'abc_000001_000011'"):
        build_index("vatex", annotations=str(p))
    ids.write_text("Ptf_2VRj-V0_000122_000132\nnope_000000_000010\n")
    p.write_text(json.dumps(items[:1]))
    with pytest.raises(FormatError, match=r"test_list\.txt:2: video 'nope_000000_000010' is not in"):
        build_index("vatex", annotations=str(p), ids=str(ids))


# ---------------------------------------------------------------- Charades


CHARADES_HEADER = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"


def _charades(tmp_path: Path, rows: list[str]) -> tuple[Path, Path]:
    classes = tmp_path / "Charades_v1_classes.txt"
    classes.write_text("c000 Holding some clothes\nc001 Putting clothes somewhere\nc002 Taking a laptop\n")
    csv = tmp_path / "Charades_v1_test.csv"
    csv.write_text(CHARADES_HEADER + "".join(r + "\n" for r in rows))
    return csv, classes


def test_charades_multi_label(tmp_path):
    csv, classes = _charades(tmp_path, [
        '46GP8,HR43,Kitchen,6,7,Yes,"A person cooks; then eats.",food;dish,"They cook.","c002 11.90 21.20;c000 0.00 '
        '12.60;c002 30.00 31.00",24.83',
        "N11GT,0KZ7,Stairs,6,7,Yes,A person walks.,stairs,They walk.,,12.5",
    ])
    index = build_index("charades", csv=str(csv), classes=str(classes), video_root="Charades_v1_480")
    a, b = index.entries
    assert a.key == "46GP8" and a.label == (2, 0) and b.label == ()  # distinct classes, first appearance; none
    assert a.meta["actions"] == [(2, 11.9, 21.2), (0, 0.0, 12.6), (2, 30.0, 31.0)] and a.meta["length"] == 24.83
    assert index.classes == ["Holding some clothes", "Putting clothes somewhere", "Taking a laptop"]
    assert a.path == str(Path("Charades_v1_480/46GP8.mp4")) and index.official.videos == 1863


@pytest.mark.parametrize(("actions", "reason"), [
    ("c009 1.0 2.0", r"class 'c009' is not in the classes file"),
    ("c001 1.0", r"'c001 1.0' is not '<class> <start> <end>'"),
    ("c001 x 2.0", r"column 'actions': 'x' is not a number"),
    ("c001 5.0 2.0", r"end before start"),
])
def test_charades_bad_actions_name_the_line(tmp_path, actions, reason):
    csv, classes = _charades(tmp_path, ["AAAAA,s,k,1,1,Yes,x,y,z,c000 0 1,3", f"BBBBB,s,k,1,1,Yes,x,y,z,{actions},3"])
    with pytest.raises(FormatError, match=rf"Charades_v1_test\.csv:3: .*{reason}"):
        build_index("charades", csv=str(csv), classes=str(classes))


# ---------------------------------------------------------------- label CSV, presets


def test_label_csv_class_names(tmp_path):
    p = tmp_path / "ZS_split1_K600.csv"
    p.write_text('id,name\n0,acting in play\n1,"backflip (human)"\n2,"a, b"\n')
    assert read_class_names(p) == ["acting in play", "backflip (human)", "a, b"]
    p.write_text("id,name\n0,a\n2,b\n")
    with pytest.raises(FormatError, match=r"ZS_split1_K600\.csv:3: class ids must be consecutive"):
        read_class_names(p)


HMDB_CLASSES = [f"act_{i:02d}" for i in range(51)]  # folder names; ViFi-CLIP's label files write "act 00"


def _vifi(tmp_path: Path) -> tuple[Path, Path]:
    """ViFi-CLIP's labels/ and datasets_splits/ for HMDB51: novel = the first 25 classes, base = the last 26."""
    labels, splits = tmp_path / "labels", tmp_path / "datasets_splits"
    labels.mkdir()
    names = [c.replace("_", " ") for c in HMDB_CLASSES]
    for part, subset in (("base", names[25:]), ("novel", names[:25])):
        rows = "".join(f"{i},{n}\n" for i, n in enumerate(subset))
        (labels / f"hmdb_51_{part}_labels.csv").write_text("id,name\n" + rows)
    b2n = splits / "base2novel_splits" / "hmdb_splits"
    b2n.mkdir(parents=True)
    (b2n / "novel_val.txt").write_text("act_00_3.avi 0\nact_24_3.avi 24\n")
    return labels, splits


def _hmdb(tmp_path: Path, per_class: int = 3) -> dict:
    d = tmp_path / "hmdb_splits"
    d.mkdir(exist_ok=True)
    for cls in HMDB_CLASSES:
        lines = [f"{cls}_{i}.avi {1 if i < per_class else 2}" for i in range(per_class + 1)]
        (d / f"{cls}_test_split1.txt").write_text("\n".join(lines) + "\n")
    return {"format": "hmdb51", "split_dir": str(d), "video_root": str(tmp_path / "hmdb"), "split": "train"}


def test_preset_source_mode_is_class_subset_and_few_shot(tmp_path):
    labels, _ = _vifi(tmp_path)
    source = _hmdb(tmp_path)
    spec, official = expand_preset("hmdb51-base2novel", "train", str(labels), source=source, seed=2)
    assert spec == {"format": "few_shot", "shots": 16, "seed": 2,
                    "source": {"format": "class_subset", "classes_file": str(labels / "hmdb_51_base_labels.csv"),
                               "source": source}} and official is None
    novel = build_index("preset", preset="hmdb51-base2novel", part="novel", labels_dir=str(labels),
                        source={**source, "split": "test"})
    assert novel.classes == HMDB_CLASSES[:25]  # the file's order; "act 00" matched loosely to folder "act_00"
    assert [e.label for e in novel.entries] == list(range(25)) and novel.entries[3].key == "act_03_3"
    base = build_index("preset", preset="hmdb51-base2novel", part="base", labels_dir=str(labels), source=source)
    assert base.classes == HMDB_CLASSES[25:] and len(base) == 26 * 3
    assert {e.meta["original_label"] for e in base.entries} == set(range(25, 51))
    with pytest.raises(ValueError, match="class 0 .* has only 3 items, fewer than 16 shots"):
        build_index("preset", preset="hmdb51-base2novel", part="train", labels_dir=str(labels), source=source)
    (labels / "hmdb_51_labels.csv").write_text("id,name\n" + "".join(f"{i},{c}\n" for i, c in enumerate(HMDB_CLASSES)))
    few = build_index("preset", preset="hmdb51-fewshot", part="train", shots=2, seed=5, labels_dir=str(labels),
                      source=source)
    assert len(few) == 2 * 51 and few.official is None


def test_preset_splits_mode_reads_vifi_lists_with_official_size(tmp_path):
    labels, splits = _vifi(tmp_path)
    index = build_index("preset", preset="hmdb51-base2novel", part="novel", labels_dir=str(labels),
                        splits_dir=str(splits), video_root="hmdb_all")
    assert [(e.key, e.label) for e in index.entries] == [("act_00_3", 0), ("act_24_3", 24)]
    assert index.classes[:2] == ["act 00", "act 01"] and index.official.videos == 750
    assert index.entries[0].path == str(Path("hmdb_all/act_00_3.avi"))
    with pytest.raises(FormatError, match="hmdb51-base2novel: part must be one of"):
        build_index("preset", preset="hmdb51-base2novel", part="eval", labels_dir=str(labels), splits_dir=str(splits))
    with pytest.raises(FormatError, match="unknown preset 'hmdb-b2n'"):
        build_index("preset", preset="hmdb-b2n", labels_dir=str(labels), splits_dir=str(splits))
    with pytest.raises(FormatError, match="train needs shots in"):
        expand_preset("ucf101-fewshot", "train", "labels", splits_dir="s", shots=3)
    spec, official = expand_preset("ucf101-fewshot", "train", "labels", splits_dir="s", shots=4)
    assert spec["list_file"] == str(Path("s/ucf_splits/train1_few_shot_4.txt")) and official.videos == 404
    (labels / "hmdb_51_novel_labels.csv").write_text("id,name\n0,act 00\n1,act 01\n")
    (splits / "base2novel_splits/hmdb_splits/novel_val.txt").write_text("act_00_3.avi 0\nact_01_3.avi 1\n")
    with pytest.raises(FormatError, match=r"hmdb_51_novel_labels\.csv: hmdb51-base2novel: expected 25 classes"):
        build_index("preset", preset="hmdb51-base2novel", part="novel", labels_dir=str(labels), splits_dir=str(splits))


def test_k600_zeroshot_preset_checks_160_classes(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "ZS_split2_K600.csv").write_text("id,name\n0,a\n1,b\n")
    lists = tmp_path / "splits" / "k600_splits"
    lists.mkdir(parents=True)
    (lists / "ZS_split2_K600_eval.txt").write_text("train/x_000001_000011.mp4 0\ntest/y_000002_000012.mp4 1\n")
    with pytest.raises(FormatError, match=r"ZS_split2_K600\.csv: k600-zeroshot: expected 160 classes, .* gives 2"):
        build_index("preset", preset="k600-zeroshot", zs_split=2, labels_dir=str(labels),
                    splits_dir=str(tmp_path / "splits"))
    spec, official = expand_preset("k600-zeroshot", None, str(labels), splits_dir="s", zs_split=3)
    assert spec["classes"].endswith("ZS_split3_K600.csv") and official.videos == 14135
    assert set(PRESETS) >= {"k600-zeroshot", "k400-base2novel", "ssv2-base2novel", "hmdb51-fewshot"}
