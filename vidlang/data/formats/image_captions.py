"""``image_captions``: still images with captions (Conceptual Captions, COCO, ...), as one-frame videos.

A CSV with a header holding an image-path column and a caption column (names set by ``image_column`` /
``caption_column``, default ``image`` and ``caption``); paths are relative to ``image_root`` (default: the CSV's
folder) unless absolute. Several rows of one image make one entry with several captions (training draws one,
evaluation uses all). ``split`` keeps the rows whose optional ``split`` column equals it. Example::

    image,caption
    training/0001.jpg,a dog runs on the beach
    training/0002.png,two people sharing a meal

The index is marked ``still_images``: the data module reads the files with the ``image`` backend
(:mod:`vidlang.data.decoding.image`) and samples one frame per clip, so a split of images gives batches of
one-frame videos (``video [B, 1, 3, S, S]``) next to the video batches (``data.train_mix``). A broken image is a
bad sample like a broken video: skipped and counted.
"""

from __future__ import annotations

from pathlib import Path

from vidlang.data.formats.base import FORMATS, FormatError, read_csv
from vidlang.data.sample import FormatIndex, VideoEntry


@FORMATS.register("image_captions")
def read_image_captions(
    csv: str,
    image_root: str | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    split: str | None = None,
) -> FormatIndex:
    """One entry per image (its rows' captions, in file order); the key is the path as written in the CSV."""
    p = Path(csv)
    root = Path(image_root) if image_root is not None else p.parent
    by_image: dict[str, VideoEntry] = {}
    for line, row in read_csv(p, (image_column, caption_column), "image-caption CSV"):
        if split is not None and row.get("split", split) != split:
            continue
        rel, caption = row[image_column], row[caption_column]
        if not rel or not caption:
            raise FormatError(p, f"empty {image_column!r} or {caption_column!r}", line=line)
        entry = by_image.get(rel)
        if entry is None:
            by_image[rel] = VideoEntry(source=str(root / rel), key=rel, captions=[caption])
        else:
            entry.captions.append(caption)
    return FormatIndex(list(by_image.values()), None, f"image captions {p}", still_images=True)
