"""What sat writes into photo metadata, and where: the description fields the photo managers
read, sat's own provenance namespace, sidecar names, and a new sidecar written from scratch.

Fields (exiftool names, ``Group:Tag``):

- ``XMP-dc:Description`` (lang-alt ``x-default``): digiKam (Xmp.dc.description first), darktable,
  Immich, PhotoPrism, Lightroom ("Caption").
- ``XMP-tiff:ImageDescription`` in sidecars, ``IFD0:ImageDescription`` (EXIF) when embedding: Immich
  reads ImageDescription or Description, PhotoPrism ImageDescription.
- ``IPTC:Caption-Abstract`` (with CodedCharacterSet UTF-8) when embedding in JPEG, TIFF and DNG.
- ``XMP-sat:*``: the text sat wrote, the model fingerprint, decode settings, score, sat version
  and date (``sat:satDescription``, ``sat:satModel``, ...), so a later run knows which
  descriptions are its own.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

NAMESPACE = "urn:sat-cli:xmp:1.0/"  # an identifier, not an address
PREFIX = "sat"
NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "xml": "http://www.w3.org/XML/1998/namespace",
    "dc": "http://purl.org/dc/elements/1.1/",
    "tiff": "http://ns.adobe.com/tiff/1.0/",
    PREFIX: NAMESPACE,
}
# sat's properties: key -> exiftool tag name (group XMP-sat); the XMP property is the tag with a
# small first letter (sat:satModel). Names of their own, so that no reader takes them for the
# camera's or the file's Model, Date or Version.
PROVENANCE = {"description": "SatDescription", "model": "SatModel", "settings": "SatSettings",
              "score": "SatScore", "version": "SatVersion", "date": "SatDate"}
# What sat 0.x wrote before (sat:model, sat:date, ...): still read and removed, never written.
LEGACY = {key: "SatOld" + tag[3:] for key, tag in PROVENANCE.items()}


def xmp_name(tag: str) -> str:
    return tag[0].lower() + tag[1:]


EXIFTOOL_CONFIG = (
    "%Image::ExifTool::UserDefined = (\n"
    "    'Image::ExifTool::XMP::Main' => {\n"
    f"        {PREFIX} => {{ SubDirectory => {{ TagTable => 'Image::ExifTool::UserDefined::{PREFIX}' }} }},\n"
    "    },\n);\n"
    f"%Image::ExifTool::UserDefined::{PREFIX} = (\n"
    f"    GROUPS => {{ 0 => 'XMP', 1 => 'XMP-{PREFIX}', 2 => 'Image' }},\n"
    f"    NAMESPACE => {{ '{PREFIX}' => '{NAMESPACE}' }},\n"
    "    WRITABLE => 'string',\n"
    + "".join(f"    {xmp_name(tag)} => {{ Name => '{tag}' }},\n" for tag in PROVENANCE.values())
    + "".join(f"    {key} => {{ Name => '{tag}' }},\n" for key, tag in LEGACY.items())
    + ");\n1;\n"
)

DESCRIPTION = "XMP-dc:Description"
SIDECAR_FIELDS = (DESCRIPTION, "XMP-tiff:ImageDescription")
EMBED_FIELDS = (DESCRIPTION, "IFD0:ImageDescription")
IPTC_FIELD = "IPTC:Caption-Abstract"
SAT_TAGS = tuple(f"XMP-{PREFIX}:{tag}" for tag in (*PROVENANCE.values(), *LEGACY.values()))
OWN_TEXTS = (f"XMP-{PREFIX}:{PROVENANCE['description']}", f"XMP-{PREFIX}:{LEGACY['description']}")
# Every field that can hold a person's description: sat never replaces one of these unless told
HUMAN_FIELDS = (DESCRIPTION, "XMP-tiff:ImageDescription", "IFD0:ImageDescription", IPTC_FIELD)
READ_TAGS = ("-XMP-dc:Description", "-XMP-dc:Description-*", "-XMP-tiff:ImageDescription",
             "-IFD0:ImageDescription", "-IPTC:all", f"-XMP-{PREFIX}:all")
# --embed into a file without IPTC: recorded in the write's `previous`, so --remove deletes the
# IPTC record sat created once nothing but exiftool's own boilerplate is left in it
CREATED_IPTC = "sat:created-IPTC"
IPTC_BOILERPLATE = {"IPTC:CodedCharacterSet", "IPTC:EnvelopeRecordVersion", "IPTC:ApplicationRecordVersion"}

# Formats sat embeds into (exiftool writes them in place of the file, pixels untouched)
EMBED_EXTENSIONS = {".jpg": True, ".jpeg": True, ".jpe": True, ".tif": True, ".tiff": True, ".dng": True,
                    ".png": False, ".heic": False, ".heif": False, ".hif": False}  # value: has IPTC
SIDECAR_NAMES = ("full", "stem")
# What cameras put in ImageDescription by themselves: not a person's description
PLACEHOLDERS = frozenset(s.casefold() for s in (
    "OLYMPUS DIGITAL CAMERA", "SONY DSC", "DIGITAL CAMERA", "KODAK Digital Still Camera", "MINOLTA DIGITAL CAMERA",
    "SAMSUNG", "SAMSUNG CAMERA PICTURES", "Exif_JPEG_PICTURE", "DCIM", "Default", "default", "Untitled",
    "Created with GIMP", "LEAD Technologies Inc. V1.01", "Picasa",
))


def sidecar_path(photo: str, naming: str = "full") -> str:
    """``photo.jpg.xmp`` (full: digiKam, darktable, Immich) or ``photo.xmp`` (stem: Lightroom,
    Capture One)."""
    if naming == "stem":
        return os.path.splitext(photo)[0] + ".xmp"
    return photo + ".xmp"


def is_placeholder(value) -> bool:
    """Empty, blank, or a camera's stock text: no one's description."""
    text = str(value).replace("\x00", "").strip() if value is not None else ""
    return not text or text.casefold() in PLACEHOLDERS


def clean_caption(text: str) -> str:
    """One line of text (exiftool takes one argument per line; a caption is one sentence)."""
    return " ".join(str(text).split())


def provenance(caption: str, model: str, settings: str, score, version: str, date: str) -> dict:
    """The ``XMP-sat`` values for a caption, keyed by exiftool tag."""
    values = {"description": caption, "model": model, "settings": settings,
              "score": "" if score is None else f"{float(score):.4f}", "version": version, "date": date}
    return {f"XMP-{PREFIX}:{PROVENANCE[k]}": v for k, v in values.items()}


def fields_for(caption: str, prov: dict, kind: str, iptc: bool = False) -> dict:
    """Every field sat sets on a target: {"Group:Tag": value}."""
    fields = dict.fromkeys(SIDECAR_FIELDS if kind == "sidecar" else EMBED_FIELDS, caption)
    if kind == "embed" and iptc:
        fields[IPTC_FIELD] = caption
    fields.update(prov)
    return fields


def write_args(fields: dict) -> list[str]:
    """exiftool arguments that set ``fields`` (None deletes a field); IPTC in UTF-8."""
    args = ["-charset", "iptc=UTF8", "-charset", "exif=UTF8"]
    if IPTC_FIELD in fields and fields[IPTC_FIELD] is not None:
        args.append("-IPTC:CodedCharacterSet=UTF8")
    for tag, value in fields.items():
        tag = tag + "-x-default" if tag == DESCRIPTION else tag  # the other languages stay as they are
        args.append(f"-{tag}=" if value is None else f"-{tag}={value}")
    return args


def new_sidecar(fields: dict, toolkit: str) -> bytes:
    """A complete XMP sidecar holding ``fields`` (the sidecar fields and sat's provenance),
    for a photo that has none yet."""
    for prefix, uri in NS.items():
        if prefix != "xml":
            ET.register_namespace(prefix, uri)
    q = lambda prefix, name: f"{{{NS[prefix]}}}{name}"  # noqa: E731
    root = ET.Element(q("x", "xmpmeta"), {q("x", "xmptk"): toolkit})
    rdf = ET.SubElement(root, q("rdf", "RDF"))
    desc = ET.SubElement(rdf, q("rdf", "Description"), {q("rdf", "about"): ""})
    dc = ET.SubElement(ET.SubElement(desc, q("dc", "description")), q("rdf", "Alt"))
    ET.SubElement(dc, q("rdf", "li"), {q("xml", "lang"): "x-default"}).text = fields[DESCRIPTION]
    ET.SubElement(desc, q("tiff", "ImageDescription")).text = fields["XMP-tiff:ImageDescription"]
    for tag in PROVENANCE.values():
        value = fields.get(f"XMP-{PREFIX}:{tag}")
        if value not in (None, ""):
            ET.SubElement(desc, q(PREFIX, xmp_name(tag))).text = str(value)
    ET.indent(root, " ")
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"
