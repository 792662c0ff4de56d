"""``vidlang data check`` (issue 15) on tiny fake copies of MSVD, DiDeMo, ActivityNet Captions, LSMDC, VATEX and
Charades in their exact file layouts: each lists three test videos, of which one decodes, one is corrupt and one is
missing, so listed / found / decodable and the warnings against the official split are known in advance."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from videos import make_video  # noqa: E402

from vidlang.cli import main  # noqa: E402
from vidlang.data.check import check_config, check_index, format_report, load_data_config  # noqa: E402
from vidlang.data.formats import build_index  # noqa: E402
from vidlang.data.sample import Official  # noqa: E402
from vidlang.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOOD = dict(num_frames=12, fps=12.0, size=(64, 48))  # 1 s at 64x48
CORRUPT = b"\x00\x00\x00\x18ftypisom" + b"\x00" * 40  # an MP4 header and nothing to decode


def _videos(paths: list[Path]) -> None:
    """The first path decodes, the second is corrupt, the third stays missing."""
    for p in paths[:2]:
        p.parent.mkdir(parents=True, exist_ok=True)
    make_video(paths[0], **GOOD)
    paths[1].write_bytes(CORRUPT)


def _yaml(path: Path, split_spec: dict) -> Path:
    path.write_text(yaml.safe_dump({"data": {"test": split_spec, "sampling": {"num_frames": 4}}}))
    return path


def build_fakes(root: Path) -> dict[str, Path]:
    """Tiny copies of each benchmark (three test videos: good, corrupt, missing); name -> data config."""
    out: dict[str, Path] = {}
    # MSVD: raw-captions.pkl + test_list.txt, YouTubeClips/{id}.avi
    d = root / "msvd"
    ids = ["-4wsuPCjDBc_5_15", "-7KMZQEsJW4_205_208", "-8y1Q0rA3n8_108_115"]
    (d / "msvd_data").mkdir(parents=True)
    with open(d / "msvd_data" / "raw-captions.pkl", "wb") as f:
        pickle.dump({v: [["a", "cat", str(i)], f"caption {i} b"] for i, v in enumerate(ids)}, f)
    (d / "msvd_data" / "test_list.txt").write_text("\n".join(ids) + "\n")
    _videos([d / "YouTubeClips" / f"{v}.avi" for v in ids])
    out["msvd"] = _yaml(d / "data.yaml", {"format": "msvd", "data_dir": str(d / "msvd_data"), "split": "test",
                                          "video_root": str(d / "YouTubeClips")})
    # DiDeMo: test_data.json (moment descriptions; paragraphs per video)
    d = root / "didemo"
    d.mkdir()
    names = ["111@N00_222_aaa.mp4", "333@N01_444_bbb.mp4", "555@N02_666_ccc.mp4"]
    items = [{"annotation_id": i, "description": f"moment {i}", "video": names[i % 3], "times": [[0, 1]],
              "dl_link": "x", "num_segments": 6} for i in range(6)]
    (d / "test_data.json").write_text(json.dumps(items, indent=1))
    _videos([d / "videos" / n for n in names])
    out["didemo"] = _yaml(d / "data.yaml", {"format": "didemo", "data_json": str(d / "test_data.json"),
                                            "video_root": str(d / "videos")})
    # ActivityNet Captions: val_1.json, v_<id>.mp4
    d = root / "activitynet"
    d.mkdir()
    keys = ["v_QOlSCBRmfWY", "v_ehGHCYKzyZ8", "v_nwznKOuZM7w"]
    ann = {k: {"duration": 1.0, "timestamps": [[0.0, 0.5], [0.4, 1.0]], "sentences": ["A man walks.", " He sits."]}
           for k in keys}
    (d / "val_1.json").write_text(json.dumps(ann, indent=1))
    _videos([d / "videos" / f"{k}.mp4" for k in keys])
    out["activitynet"] = _yaml(d / "data.yaml", {"format": "activitynet", "captions_json": str(d / "val_1.json"),
                                                 "video_root": str(d / "videos")})
    # LSMDC: the tab-separated public test file, {movie}/{clip}.avi
    d = root / "lsmdc"
    d.mkdir()
    clips = [f"0001_American_Beauty_00.00.{s:02d}.000-00.00.{s + 2:02d}.000" for s in (10, 20, 30)]
    rows = [f"{c}\t00.00.10.000\t00.00.12.000\t00.00.10.000\t00.00.12.000\tSomeone does thing {i}."
            for i, c in enumerate(clips)]
    (d / "LSMDC16_challenge_1000_publictect.csv").write_text("\n".join(rows) + "\n")
    _videos([d / "videos" / "0001_American_Beauty" / f"{c}.avi" for c in clips])
    out["lsmdc"] = _yaml(d / "data.yaml", {"format": "lsmdc", "annotations": str(d /
                                                                                  "LSMDC16_challenge_1000_publictect.csv"),
                                           "video_root": str(d / "videos")})
    # VATEX: vatex_validation_v1.0.json + the 1.5k test id list
    d = root / "vatex"
    d.mkdir()
    vids = ["Ptf_2VRj-V0_000122_000132", "abc_000001_000011", "xyz_000020_000030"]
    items = [{"videoID": v, "enCap": [f"{v} caption {j}" for j in range(10)], "chCap": ["中"] * 10} for v in vids]
    (d / "vatex_validation_v1.0.json").write_text(json.dumps(items, indent=1, ensure_ascii=False))
    (d / "test_list.txt").write_text("\n".join(vids) + "\n")
    _videos([d / "videos" / f"{v}.mp4" for v in vids])
    out["vatex"] = _yaml(d / "data.yaml", {"format": "vatex", "annotations": str(d / "vatex_validation_v1.0.json"),
                                           "ids": str(d / "test_list.txt"), "split": "test",
                                           "video_root": str(d / "videos")})
    # Charades: Charades_v1_test.csv + Charades_v1_classes.txt, Charades_v1_480/{id}.mp4
    d = root / "charades"
    d.mkdir()
    (d / "Charades_v1_classes.txt").write_text("c000 Holding some clothes\nc001 Putting clothes somewhere\n")
    header = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
    vids = ["46GP8", "N11GT", "0IH69"]
    (d / "Charades_v1_test.csv").write_text(header + "".join(
        f"{v},s,Kitchen,6,7,Yes,x,y,z,c00{i % 2} 0.00 1.00,1.0\n" for i, v in enumerate(vids)))
    _videos([d / "Charades_v1_480" / f"{v}.mp4" for v in vids])
    out["charades"] = _yaml(d / "data.yaml", {"format": "charades", "csv": str(d / "Charades_v1_test.csv"),
                                              "classes": str(d / "Charades_v1_classes.txt"),
                                              "video_root": str(d / "Charades_v1_480")})
    return out


# official (videos, captions) each reader expects for the split its fake stands for
OFFICIAL = {"msvd": (670, 27763), "didemo": (1004, 1004), "activitynet": (4917, 4917), "lsmdc": (1000, 1000),
            "vatex": (1500, 15000), "charades": (1863, None)}
CAPTIONS = {"msvd": 6, "didemo": 3, "activitynet": 3, "lsmdc": 3, "vatex": 30, "charades": 0}


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> dict[str, Path]:
    return build_fakes(tmp_path_factory.mktemp("fakes"))


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_listed_found_decodable_and_official_warnings(fakes, name):
    report = check_config(load_data_config([fakes[name]]))
    r = report["splits"]["test"]
    assert (r["listed_videos"], r["found"], r["missing"], r["checked"], r["decodable"], r["undecodable"]) == \
        (3, 2, 1, 2, 1, 1)  # fmt: skip
    assert r["captions"] == CAPTIONS[name]
    assert (r["official"]["videos"], r["official"]["captions"]) == OFFICIAL[name]
    assert r["resolution"] == {"64x48": 1} and 0.5 < r["duration_s"]["max"] <= 1.0
    assert not r["sampled"] and len(r["missing_examples"]) == 1 and r["undecodable_examples"][0]["reason"]
    text = "\n".join(r["warnings"])
    assert "1 of 3 listed videos are missing" in text and "1 of 2 checked videos do not decode" in text
    assert f"the annotations list 3 videos, the official {r['official']['name']} has {OFFICIAL[name][0]}" in text
    assert f"1 available of the official {OFFICIAL[name][0]} videos" in text and "not comparable" in text
    assert report["warnings"] == [f"test: {w}" for w in r["warnings"]]


def test_command_prints_and_writes_the_json_report(fakes, tmp_path, capsys):
    out = tmp_path / "msvd_check.json"
    assert main(["data", "check", "--config", str(fakes["msvd"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test: msvd" in printed and "videos: listed 3 (6 captions) | found 2 | decodable 1 of 2 checked" in printed
    assert "official: MSVD test: 670 videos, 27763 captions" in printed and "WARNING: " in printed
    assert "resolution: 64x48 x1" in printed and f"report: {out}" in printed
    report = json.loads(out.read_text())
    assert report["config"] == [str(fakes["msvd"])] and report["splits"]["test"]["decodable"] == 1
    assert main(["data", "check", "--config", str(fakes["msvd"]), "--out", str(out), "--strict"]) == 1
    capsys.readouterr()
    # a protocol's official size applies to the evaluation splits
    assert main(["data", "check", "--config", str(fakes["charades"]), "--out", str(out), "--protocol", "msvd"]) == 0
    assert json.loads(out.read_text())["splits"]["test"]["official"]["name"] == "MSVD test"


def _complete(tmp_path: Path, n: int) -> Path:
    rows = ["key,path,split,captions"]
    for i in range(n):
        make_video(tmp_path / f"v{i}.mp4", **GOOD)
        rows.append(f'v{i},v{i}.mp4,test,"[""clip {i}""]"')
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "m.csv"


def test_complete_copy_of_the_official_size_has_no_warning(tmp_path):
    index = build_index("manifest", path=str(_complete(tmp_path, 3)), split="test")
    r = check_index(index, official=Official("tiny official", 3, 3, "test"))
    assert (r["found"], r["decodable"], r["warnings"]) == (3, 3, [])
    assert "no warning" in format_report({"splits": {"test": {**r, "format": "manifest"}}, "warnings": []})
    short = check_index(index, official=Official("tiny official", 4, 3, "test"))
    assert short["warnings"] == ["the annotations list 3 videos, the official tiny official has 4: another split or "
                                 "another release", "3 available of the official 4 videos of tiny official: numbers "
                                 "on this copy are not comparable with published ones"]
    assert check_index(index)["warnings"] == []  # no official size recorded, nothing missing


def test_seeded_sample_decodes_n_videos(tmp_path):
    index = build_index("manifest", path=str(_complete(tmp_path, 5)), split="test")
    a = check_index(index, sample=2, seed=1)
    assert (a["checked"], a["decodable"], a["sampled"], a["found"]) == (2, 2, True, 5)
    assert a == check_index(index, sample=2, seed=1)  # the same videos for the same seed
    assert check_index(index, sample=9)["sampled"] is False  # a sample larger than the split checks all
    with pytest.raises(ConfigError, match="--sample must be >= 1"):
        check_config({"test": {"format": "manifest", "path": str(tmp_path / "m.csv"), "split": "test"}}, sample=0)


def test_config_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["data", "check", "--config", str(missing)]) == 2
    assert "nope.yaml: config file not found" in capsys.readouterr().err
    no_data = tmp_path / "model.yaml"
    no_data.write_text("model: {}\n")
    with pytest.raises(ConfigError, match="model.yaml: no 'data' section"):
        load_data_config([no_data])


@pytest.mark.parametrize(("config", "protocol"), [
    ("msvd", "msvd"), ("didemo", "didemo-paragraph"), ("activitynet", "anet-paragraph"), ("lsmdc", "lsmdc"),
    ("vatex", "vatex"), ("charades", "charades"), ("msrvtt", "msrvtt-1ka"), ("k600_zeroshot", "k600-zeroshot-1"),
])
def test_shipped_data_configs_follow_their_protocol(config, protocol):
    from vidlang.data.config import SamplingConfig, TransformConfig, as_config
    from vidlang.eval.protocols import get_protocol

    data = yaml.safe_load((REPO / "configs" / "data" / f"{config}.yaml").read_text())["data"]
    sampling = as_config(SamplingConfig, data["sampling"], "sampling")
    transform = as_config(TransformConfig, data.get("transform", {}), "transform")
    assert get_protocol(protocol).check_sampling(sampling, transform) == []
    spec = data["test"]
    for key, value in get_protocol(protocol).data:  # the reader and its split arguments
        if key in spec:
            assert spec[key] == value, (config, key)
    assert spec["format"] == dict(get_protocol(protocol).data)["format"]
