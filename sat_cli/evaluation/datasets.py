"""Caption data sets: Karpathy-split JSON, COCO caption annotation files and plain CSV."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..model.vocab import tokenize


@dataclass
class Entry:
    """One image with its human captions."""

    path: str  # absolute path of the image file
    split: str  # train | val | test
    captions: list[list[str]] = field(default_factory=list)  # tokenized
    raw: list[str] = field(default_factory=list)  # as written
    image_id: str | int | None = None
    source: str | None = None  # the collection it comes from (Karpathy "source"/"dataset", "coco"): scored apart


@dataclass
class CaptionData:
    entries: list[Entry]
    source: str
    missing: list[str] = field(default_factory=list)  # image files that do not exist

    def split(self, name: str) -> list[Entry]:
        return [e for e in self.entries if e.split == name]


def _held_out(key: str, fraction: float) -> bool:
    """A stable pseudo-random choice of validation images, by name."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def read_karpathy(path: Path, images: Path) -> list[Entry]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(f"{path}: not a Karpathy-split file (no 'images' list)")
    entries = []
    dataset = data.get("dataset")
    for im in data["images"]:
        try:
            folder = images / im["filepath"] if im.get("filepath") else images
            sentences = im["sentences"]
            split = {"restval": "train"}.get(im["split"], im["split"])
            entries.append(Entry(
                path=str((folder / im["filename"]).resolve()),
                split=split,
                captions=[s.get("tokens") or tokenize(s["raw"]) for s in sentences],
                raw=[s.get("raw") or " ".join(s["tokens"]) for s in sentences],
                image_id=im.get("cocoid", im.get("imgid", im["filename"])),
                source=im.get("source") or dataset,
            ))
        except (KeyError, TypeError) as exc:
            raise DataError(f"{path}: image record without {exc} ({str(im)[:120]})") from None
    return entries


def read_coco(path: Path, images: Path, split: str | None, val_fraction: float) -> list[Entry]:
    data = json.loads(path.read_text())
    by_id = {}
    for im in data["images"]:
        by_id[im["id"]] = Entry(path=str((images / im["file_name"]).resolve()), split="", image_id=im["id"],
                                source="coco")
    for ann in data["annotations"]:
        entry = by_id.get(ann["image_id"])
        if entry is not None:
            entry.raw.append(ann["caption"].strip())
            entry.captions.append(tokenize(ann["caption"]))
    name = path.stem.lower()
    fixed = split or ("val" if "val" in name else "test" if "test" in name else None)
    for entry in by_id.values():
        entry.split = fixed or ("val" if _held_out(str(entry.image_id), val_fraction) else "train")
    return [e for e in by_id.values() if e.captions]


def read_csv(path: Path, images: Path, val_fraction: float) -> list[Entry]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DataError(f"{path} is empty")
    header = [c.strip().lower() for c in rows[0]]
    image_names, caption_names = ("image", "path", "file", "filename", "file_name", "image_path"), (
        "caption", "text", "sentence", "description")
    if any(h in image_names for h in header) and any(h in caption_names for h in header):
        col_image = next(i for i, h in enumerate(header) if h in image_names)
        col_caption = next(i for i, h in enumerate(header) if h in caption_names)
        col_split = header.index("split") if "split" in header else None
        rows = rows[1:]
    else:
        col_image, col_caption, col_split = 0, 1, None
    by_path: dict[str, Entry] = {}
    for n, row in enumerate(rows, start=2):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) <= max(col_image, col_caption):
            raise DataError(f"{path}:{n}: expected image path and caption columns, got {row}")
        file = row[col_image].strip()
        full = str((images / file).resolve()) if not os.path.isabs(file) else file
        entry = by_path.setdefault(full, Entry(path=full, split="", image_id=file))
        if col_split is not None and len(row) > col_split and row[col_split].strip():
            entry.split = row[col_split].strip().lower()
        entry.raw.append(row[col_caption].strip())
        entry.captions.append(tokenize(row[col_caption]))
    for entry in by_path.values():
        if not entry.split:
            entry.split = "val" if _held_out(str(entry.image_id), val_fraction) else "train"
    return list(by_path.values())


def load_captions(data: str | Path, images: str | Path | None = None, split: str | None = None,
                  val_fraction: float = 0.05, need_images: bool = True) -> CaptionData:
    """Read a caption file in any supported format; images are looked up under ``images``
    (default: the caption file's folder). Missing image files are counted and left out, unless
    ``need_images`` is False (references for stored captions: only the names count)."""
    path = Path(data).expanduser()
    if not path.is_file():
        raise DataError(f"Caption file not found: {path}")
    root = Path(images).expanduser() if images else path.parent
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        entries = read_csv(path, root, val_fraction)
    else:
        try:
            head = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not JSON ({exc}); give a Karpathy JSON, a COCO captions JSON or a CSV") from None
        if isinstance(head, dict) and "annotations" in head:
            entries = read_coco(path, root, split, val_fraction)
        else:
            entries = read_karpathy(path, root)
    if not need_images:
        return CaptionData(entries=list(entries), source=str(path), missing=[])
    present, missing = [], []
    for e in entries:
        (present if os.path.isfile(e.path) else missing).append(e)
    if not present:
        raise DataError(f"None of the {len(entries)} images of {path} exist under {root}; set --images")
    return CaptionData(entries=present, source=str(path), missing=[e.path for e in missing])
