"""What `sat metadata` does to one file, decided from plain values (no I/O): write, leave alone
(already there), or skip (a person's description is there); and what `--remove` puts back."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..inputs.paths import display
from .xmp import (CREATED_IPTC, DESCRIPTION, HUMAN_FIELDS, IPTC_BOILERPLATE, OWN_TEXTS, SAT_TAGS, clean_caption,
                  is_placeholder)

UNCOMPARED = {"XMP-sat:SatDate"}  # a rewrite only for a new date would churn every file


@dataclass
class Plan:
    action: str  # create | update | unchanged | skip
    reason: str = ""
    fields: dict = field(default_factory=dict)  # what to set on the target
    previous: dict = field(default_factory=dict)  # what those fields held before (restored by --remove)


def descriptions(fields: dict) -> dict:
    """The description-like values a file holds: {"Group:Tag": text}, every language of
    dc:description included, blanks and camera placeholders left out."""
    out = {}
    for tag, value in fields.items():
        if (tag in HUMAN_FIELDS or tag.startswith(DESCRIPTION + "-")) and not is_placeholder(value):
            out[tag] = clean_caption(value)
    return out


def owned_texts(files: dict[str, dict], recorded: set[str]) -> set[str]:
    """Texts known to be sat's: what the database says it wrote for this photo, and what sat's
    provenance in any of its files says."""
    own = {clean_caption(t) for t in recorded if t}
    own.update(clean_caption(f[tag]) for f in files.values() for tag in OWN_TEXTS if f.get(tag))
    return own


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if str(a) == str(b):
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def plan_write(target: str, files: dict[str, dict], wanted: dict, own: set[str], overwrite: bool,
               exists: bool) -> Plan:
    """``files``: the current fields of every file that describes the photo (the photo itself and
    its sidecars, by name), ``target`` the one to write; ``wanted`` the fields to set."""
    if not overwrite:
        for name, fields in files.items():
            for tag, text in descriptions(fields).items():
                if text not in own:
                    shown = text if len(text) <= 60 else text[:57] + "..."
                    where = f" (in {display(os.path.basename(name))})"
                    return Plan("skip", f"keeps its description{where}, {tag}: {shown!r}; --overwrite replaces it")
    current = files.get(target, {})
    if exists and all(_same(current.get(tag), value) for tag, value in wanted.items() if tag not in UNCOMPARED):
        return Plan("unchanged", "already holds this caption")
    previous = {tag: current[tag] for tag in wanted
                if tag not in SAT_TAGS and current.get(tag) is not None and clean_caption(current[tag]) not in own}
    fields = dict(wanted)
    fields.update({tag: None for tag in SAT_TAGS if tag not in wanted and current.get(tag) is not None})  # old names
    return Plan("update" if exists else "create", fields=fields, previous=previous)


def plan_remove(current: dict, written: str, written_tags: tuple, previous: dict) -> tuple[dict, list[str]]:
    """The fields to set on a file to take back what sat wrote: each field that still holds sat's
    text gets back what it held before (or is deleted); sat's provenance goes. Returns (fields,
    tags a person has changed since, which are left alone)."""
    fields, kept = {}, []
    for tag in written_tags:
        value = current.get(tag)
        if value is None:
            continue
        if clean_caption(value) == clean_caption(written):
            fields[tag] = previous.get(tag)
        else:
            kept.append(tag)
    for tag in SAT_TAGS:
        if current.get(tag) is not None:
            fields[tag] = None
    iptc_left = {t for t in current if t.startswith("IPTC:")} - IPTC_BOILERPLATE
    iptc_left -= {t for t, value in fields.items() if value is None}
    if previous.get(CREATED_IPTC) and not iptc_left and any(t.startswith("IPTC:") for t in current):
        fields = {t: v for t, v in fields.items() if not t.startswith("IPTC:")}
        fields["IPTC:all"] = None  # sat created the record and only its boilerplate is left
    return fields, kept


def only_sat_left(xmp_tags: dict, removing: dict) -> bool:
    """True when a sidecar would hold nothing but its toolkit line once ``removing`` is applied."""
    left = {tag for tag in xmp_tags if tag != "XMP-x:XMPToolkit"}
    left -= {tag for tag, value in removing.items() if value is None}
    return not left
