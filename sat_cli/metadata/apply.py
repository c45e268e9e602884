"""`sat metadata` and `sat caption --xmp`: put each photo's best stored caption where photo
managers read it (an XMP sidecar, or the file's own XMP/EXIF/IPTC), never over a person's
description, merging into what is there; `--remove` takes back exactly what sat wrote.

Decisions are plan's, file changes files', the records table's (all in this package)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

from .. import __version__
from ..inputs.paths import display
from .files import FileProblem, create_file, remove_file, rewrite, sha256_file
from .plan import owned_texts, plan_remove, plan_write, only_sat_left
from .table import carry_results, mark_removed, photo_paths, records, save_write, targets
from .xmp import (CREATED_IPTC, EMBED_EXTENSIONS, EMBED_FIELDS, EXIFTOOL_CONFIG, IPTC_FIELD, READ_TAGS, SIDECAR_FIELDS,
                  clean_caption, fields_for, new_sidecar, provenance, sidecar_path, write_args)

CHUNK = 64  # files read by one exiftool call


@dataclass
class MetadataOptions:
    kind: str = "sidecar"  # sidecar | embed
    naming: str = "full"  # sidecar names: full (photo.jpg.xmp) | stem (photo.xmp)
    backup: bool = False  # keep the original of every file sat rewrites as FILE_original
    dry_run: bool = False
    overwrite: bool = False  # replace descriptions sat did not write
    quiet: bool = False


@dataclass
class MetadataSummary:
    counts: dict = field(default_factory=lambda: defaultdict(int))  # action -> files
    lines: list = field(default_factory=list)  # (action, file, message) worth showing

    @property
    def exit_code(self) -> int:
        """0 done (skipped photos included), 1 some files could not be written or were missing."""
        return 1 if self.counts.get("failed") or self.counts.get("missing") else 0

    def add(self, action: str, file: str, message: str = "", show: bool = False):
        self.counts[action] += 1
        if show or action == "failed":
            self.lines.append((action, file, message))


def write_metadata(db_path: str, options: MetadataOptions, run: int | None = None,
                   of_run: int | None = None) -> MetadataSummary:
    """Write the best caption of each stored photo (all, ``run``'s model, or ``of_run``'s photos)."""
    from ..store.writes import now, open_db
    from .exiftool import ExifTool

    db = open_db(db_path, must_exist=True)
    summary = MetadataSummary()
    todo = targets(db, run=run, of_run=of_run)
    held = records(db)
    recorded = defaultdict(set)
    for rec in held.values():
        recorded[rec["image_id"]].add(rec["caption"])
    files = _assign(todo, options, summary)
    stamp = now()
    with ExifTool(config=EXIFTOOL_CONFIG) as et, _progress(options, len(files), "Writing metadata") as step:
        for start in range(0, len(files), CHUNK):
            chunk = files[start:start + CHUNK]
            seen = _read(et, [name for target, file in chunk for name in _related(target.path, file)])
            for target, file in chunk:
                related = {name: seen.get(name, {}) for name in _related(target.path, file)}
                _write_one(db, et, target, file, related, recorded[target.image_id], options, summary, stamp)
                step()
    db.close()
    return summary


def _assign(todo, options, summary) -> list:
    """(target, file to write) pairs; two photos that would share one sidecar name get neither."""
    by_file = defaultdict(list)
    for t in todo:
        file = t.path if options.kind == "embed" else sidecar_path(t.path, options.naming)
        by_file[file].append(t)
    out = []
    for file, group in by_file.items():
        if len(group) > 1:
            names = " and ".join(display(os.path.basename(t.path)) for t in group)
            for t in group:
                summary.add("failed", t.path, f"{names} would share {display(os.path.basename(file))}: "
                                              "use --sidecar-name full")
            continue
        target = group[0]
        if not os.path.exists(target.path):
            summary.add("failed", target.path, "the photo is no longer there")
        elif options.kind == "embed" and os.path.splitext(target.path)[1].lower() not in EMBED_EXTENSIONS:
            summary.add("failed", target.path, f"sat cannot embed into {os.path.splitext(target.path)[1] or 'these'} "
                                               "files: use --sidecar")
        else:
            out.append((target, file))
    return out


def _related(photo: str, file: str) -> list[str]:
    """Every file whose description a photo manager may show for ``photo``: the photo and both sidecars."""
    names = [photo, sidecar_path(photo, "full"), sidecar_path(photo, "stem")]
    return [n for n in dict.fromkeys(names) if n == file or os.path.exists(n)]


def _read(et, names: list[str], tags=READ_TAGS) -> dict:
    """The fields of existing files by name; a name exiftool's JSON did not give back exactly
    (not UTF-8) is read alone."""
    names = [n for n in dict.fromkeys(names) if os.path.exists(n)]
    found = et.read(names, list(tags))
    for name in names:
        if name not in found:
            out, _ = et.execute("-j", "-G1", "-a", "-charset", "iptc=UTF8", "-charset", "exif=UTF8", *tags, name)
            rows = json.loads(out) if out.strip() else [{}]
            rows[0].pop("SourceFile", None)
            found[name] = rows[0]
    return found


def _write_one(db, et, target, file, related, recorded, options, summary, stamp):
    from ..store.writes import Store

    caption = clean_caption(target.caption)
    iptc = EMBED_EXTENSIONS.get(os.path.splitext(file)[1].lower(), False)
    prov = provenance(caption, target.model_fingerprint, target.settings_key, target.score, __version__, stamp)
    wanted = fields_for(caption, prov, options.kind, iptc=iptc)
    exists = os.path.exists(file)
    plan = plan_write(file, related, wanted, owned_texts(related, recorded), options.overwrite, exists)
    if iptc and options.kind == "embed" and not any(k.startswith("IPTC:") for k in related.get(file, {})):
        plan.previous[CREATED_IPTC] = True  # --remove takes the whole IPTC record back
    if plan.action in ("skip", "unchanged"):
        summary.add(plan.action, target.path, plan.reason, show=plan.action == "skip")
        return
    if options.dry_run:
        replacing = f" (replacing {', '.join(f'{k}: {v!r}' for k, v in plan.previous.items())})" if plan.previous else ""
        summary.add(plan.action, file, repr(caption) + replacing, show=True)
        return
    try:
        backup = None
        if plan.action == "create" and options.kind == "sidecar":
            create_file(file, new_sidecar(plan.fields, f"sat {__version__}"))
        else:
            backup = rewrite(et, file, write_args(plan.fields), options.backup)
    except FileProblem as exc:
        summary.add("failed", file, str(exc))
        return
    new_sha = sha256_file(file)
    with Store(db).write():
        save_write(db, target, file, options.kind, plan.fields, plan.previous, created=plan.action == "create",
                   backup=backup, file_sha256=new_sha, version=__version__, stamp=stamp)
        if options.kind == "embed" and new_sha:  # same pixels, new bytes: keep it captioned
            carry_results(db, target.image_id, new_sha, os.path.getsize(file))
    summary.add(plan.action, file, repr(caption))


def remove_metadata(db_path: str, options: MetadataOptions, kinds=("sidecar", "embed")) -> MetadataSummary:
    """Take back what sat wrote (as recorded): restore the fields it replaced, delete the ones it
    added, delete sidecars it created that hold nothing else; descriptions edited since stay."""
    from ..store.writes import Store, now, open_db
    from .exiftool import ExifTool

    db = open_db(db_path, must_exist=True)
    summary = MetadataSummary()
    held = [(key, rec) for key, rec in records(db).items() if rec["kind"] in kinds]
    photos = photo_paths(db)
    stamp = now()
    with ExifTool(config=EXIFTOOL_CONFIG) as et, _progress(options, len(held), "Removing metadata") as step:
        for key, rec in held:
            file = os.fsdecode(key)
            photo = photos.get(rec["image_id"], file if rec["kind"] == "embed" else None)
            action, message = _remove_one(et, file, rec, options, photo)
            if action not in ("failed", "missing") and not options.dry_run:
                with Store(db).write():
                    mark_removed(db, key, stamp)
            summary.add(action, file, message, show=options.dry_run or action in ("kept", "failed", "missing"))
            step()
    db.close()
    return summary


def _remove_one(et, file: str, rec: dict, options, photo: str | None) -> tuple[str, str]:
    if not os.path.exists(file):
        if photo is None or not os.path.exists(photo):  # moved away, not cleaned: the record stays
            return "missing", "the photo is not there (moved or unmounted?): its record is kept for a later --remove"
        return "gone", "no longer there"  # the sidecar was deleted beside its photo
    current = _read(et, [file]).get(file, {})
    tags = SIDECAR_FIELDS if rec["kind"] == "sidecar" else (*EMBED_FIELDS, IPTC_FIELD)
    fields, kept = plan_remove(current, rec["caption"], tags, rec["previous"])
    note = f"; kept {', '.join(kept)} (changed since sat wrote it)" if kept else ""
    delete = False
    if rec["kind"] == "sidecar" and rec["created_file"]:
        delete = only_sat_left(_read(et, [file], ("-XMP:all",)).get(file, {}), fields)
    if not fields and not delete:
        return ("kept" if kept else "removed"), "nothing of sat's left" + note
    if options.dry_run:
        return "removed", ("delete the sidecar sat created" if delete else _describe(fields)) + note
    try:
        if delete:
            remove_file(file)
        else:
            rewrite(et, file, write_args(fields), options.backup)
    except FileProblem as exc:
        return "failed", str(exc)
    return ("kept" if kept else "removed"), ("deleted the sidecar sat created" if delete else _describe(fields)) + note


def _describe(fields: dict) -> str:
    return ", ".join(f"{tag} {'deleted' if value is None else f'back to {value!r}'}" for tag, value in fields.items())


@contextmanager
def _progress(options, total: int, label: str):
    """A progress bar over files; yields the function that advances it."""
    from ..progress import progress_bar

    with progress_bar("files", options.quiet or total == 0) as bar:
        task = bar.add_task(label, total=total, status="")
        yield lambda: bar.advance(task)


def report(summary: MetadataSummary, options: MetadataOptions, console, verb: str = "written") -> None:
    """The closing lines (stderr): one line per skipped, failed (and, dry-run, planned) file, then counts."""
    from rich.markup import escape

    style = {"failed": "red", "missing": "red", "skip": "yellow", "kept": "yellow"}
    label = {"create": "would create", "update": "would update", "removed": "would take back"} if options.dry_run else {}
    for action, file, message in summary.lines[:200]:
        console.print(f"  [{style.get(action, 'default')}]{label.get(action, action)}[/] {escape(display(file))}: "
                      f"{escape(message)}", highlight=False)
    if len(summary.lines) > 200:
        console.print(f"  ... and {len(summary.lines) - 200} more")
    c = summary.counts
    head = "Dry run, nothing changed: " if options.dry_run else ""
    parts = [f"{c[k]} {label}" for k, label in (("create", "created"), ("update", "updated"), ("unchanged", "unchanged"),
                                                ("skip", "skipped (a description sat did not write)"),
                                                ("removed", "taken back"), ("kept", "taken back in part"),
                                                ("gone", "gone"), ("missing", "missing (record kept)"),
                                                ("failed", "failed")) if c.get(k)]
    console.print(head + (", ".join(parts) if parts else f"nothing {verb}"), highlight=False)


def sidecars_after_caption(db_path: str, run_id: int, naming: str, quiet: bool, console) -> int:
    """`sat caption --xmp`: the sidecars of the photos this run looked at; returns the exit status."""
    options = MetadataOptions(kind="sidecar", naming=naming, quiet=quiet)
    summary = write_metadata(db_path, options, of_run=run_id)
    if not quiet:
        report(summary, options, console, verb="to write")
    return summary.exit_code
