"""Bad rows name the physical line where the record starts, in every reader; rows without a caption are refused.

Policy (as for every malformed row): the reader raises :class:`FormatError` ``file:line: reason`` and the
file is refused; nothing is skipped silently.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from vidlang.data.formats import FormatError, build_index

WEBVID = ["videoid", "contentUrl", "duration", "page_dir", "name"]


def write(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.write_bytes((end.join(lines) + end).encode("utf-8"))
    return path


def webvid_lines(bad: str, before: list[str] | None = None) -> list[str]:
    good = [f"{i},u,PT00H00M10S,d,caption {i}" for i in range(5)]
    return [",".join(WEBVID), *(before or good), bad, "10,u,PT00H00M10S,d,after"]


def expect(path: Path, line: int, reason: str, fmt: str = "webvid", **kw) -> FormatError:
    arg = {"webvid": "csv", "manifest": "path", "kinetics": "csv", "msrvtt": "csv"}[fmt]
    with pytest.raises(FormatError, match=rf"{path.name}:{line}: {reason}") as info:
        build_index(fmt, **{arg: str(path)}, **kw)
    assert info.value.line == line
    return info.value


def test_bad_record_spanning_two_lines_is_reported_where_it_starts(tmp_path):
    # line 7 starts a record whose quoted caption runs on to line 8 (the line the old reader reported)
    p = write(tmp_path / "w.csv", webvid_lines('9,u,PT1X,d,"a caption\nwith a newline"'))
    expect(p, 7, "column 'duration'")


def test_line_count_after_multiline_records_blank_lines_and_crlf(tmp_path):
    before = ["0,u,PT00H00M10S,d,cap", '1,u,PT00H00M10S,d,"two\nlines"', "", "2,u,PT00H00M10S,d,cap"]
    p = write(tmp_path / "w.csv", webvid_lines("9,u,PT1X,d,bad", before))  # header 1, rows 2, 3-4, blank 5, 6, bad 7
    expect(p, 7, "column 'duration'")
    crlf = write(tmp_path / "c.csv", webvid_lines('9,u,PT1X,d,"a\r\nb"'), end="\r\n")
    expect(crlf, 7, "column 'duration'")


def test_unterminated_quote_is_refused_not_swallowed(tmp_path):
    # the old reader read the rest of the file into this caption and trained on fewer rows, silently
    p = write(tmp_path / "w.csv", webvid_lines('9,u,PT00H00M10S,d,"never closed'))
    expect(p, 7, "unterminated quoted field|malformed CSV")


def test_ragged_row_names_its_line_and_counts(tmp_path):
    p = write(tmp_path / "w.csv", webvid_lines('9,u,"PT00H00M\n10S",d'))
    err = expect(p, 7, "expected 5 fields")
    assert "got 4" in err.reason


def test_manifest_kinetics_msrvtt_report_the_start_line(tmp_path):
    m = write(tmp_path / "m.csv", ["path,captions,label", "a.mp4,\"[\"\"x\"\"]\",1", 'b.mp4,"[""multi\nline""]",x'])
    expect(m, 3, "column 'label'", "manifest")
    k = write(tmp_path / "k.csv", ["label,youtube_id,time_start,time_end,split", 'a,"y\n1",1,x,train'])
    expect(k, 2, "column 'time_end'", "kinetics")
    v = write(tmp_path / "t.csv", ["key,vid_key,video_id,sentence", "k,v,video0,ok", 'k,v,"",""'])
    expect(v, 3, "empty 'video_id' or 'sentence'", "msrvtt", video_root=str(tmp_path))


def test_list_files_count_physical_lines(tmp_path):
    # str.splitlines() also splits at \x0c, \x1c, \x85, \u2028 ...: a path holding one shifted every later line
    (tmp_path / "classes.txt").write_text("a\nb\n")
    lst = write(tmp_path / "list.txt", ["x.mp4 0", "odd\u2028name.mp4 1", "y.mp4 9"])
    with pytest.raises(FormatError, match=r"list\.txt:3: label 9"):
        build_index("kinetics", list_file=str(lst), classes=str(tmp_path / "classes.txt"))
    cls = write(tmp_path / "ci.txt", ["1 a\x0cb", "3 c"])
    with pytest.raises(FormatError, match=r"ci\.txt:2: class indices"):
        build_index("kinetics", list_file=str(lst), classes=str(cls))


def test_invalid_utf8_names_its_line(tmp_path):
    p = tmp_path / "w.csv"
    p.write_bytes("\n".join(webvid_lines("9,u,PT00H00M10S,d,ok")).encode().replace(b"ok", b"\xff\xfe"))
    expect(p, 7, "not valid UTF-8")


def test_utf8_bom_header_is_read(tmp_path):
    p = tmp_path / "w.csv"
    p.write_bytes(b"\xef\xbb\xbf" + ("\n".join(webvid_lines("9,u,PT00H00M10S,d,ok")) + "\n").encode())
    assert len(build_index("webvid", csv=str(p))) == 7


# -- empty captions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ('b.mp4,[],', "empty caption list"),
        ('b.mp4,"[""ok"", ""  ""]",', "blank caption"),
        ('b.mp4,,', "no caption and no label"),
    ],
)
def test_manifest_csv_row_without_caption_is_refused(tmp_path, row, reason):
    m = write(tmp_path / "m.csv", ["path,captions,label", 'a.mp4,"[""x""]",', row])
    expect(m, 3, reason, "manifest")


def test_manifest_jsonl_row_without_caption_is_refused(tmp_path):
    for i, row in enumerate([{"path": "b.mp4", "captions": []}, {"path": "b.mp4", "caption": ""},
                             {"path": "b.mp4", "captions": None}, {"path": "b.mp4"}]):
        m = write(tmp_path / f"m{i}.jsonl", [json.dumps({"path": "a.mp4", "caption": "x"}), json.dumps(row)])
        with pytest.raises(FormatError, match=rf"m{i}\.jsonl:2: (empty caption list|no caption and no label)"):
            build_index("manifest", path=str(m))


def test_manifest_label_only_rows_still_read(tmp_path):
    m = write(tmp_path / "m.csv", ["path,caption,label", "a.mp4,,1", "b.mp4,a caption,0"])
    index = build_index("manifest", path=str(m), classes=str(write(tmp_path / "c.txt", ["x", "y"])))
    assert [(e.captions, e.label) for e in index.entries] == [([], 1), (["a caption"], 0)]


def test_blank_captions_refused_in_msrvtt_train_and_howtocaption(tmp_path):
    csv = write(tmp_path / "train.csv", ["video_id", "video0"])
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"sentences": [{"video_id": "video0", "caption": "ok"},
                                              {"video_id": "video0", "caption": " "}]}))
    with pytest.raises(FormatError, match=r"data\.json: sentences\[1\]: blank caption"):
        build_index("msrvtt", csv=str(csv), video_root=str(tmp_path), data_json=str(data))
    vcsv = write(tmp_path / "v.csv", ["video_id,video_path", "vidA,a.mp4"])
    (tmp_path / "a.pkl").write_bytes(pickle.dumps({"vidA": {"start": [0.0], "end": [1.0], "text": [["ok", ""]]}}))
    with pytest.raises(FormatError, match=r"a\.pkl: video 'vidA' window 0: blank caption"):
        build_index("howtocaption", annotations=str(tmp_path / "a.pkl"), video_csv=str(vcsv))
