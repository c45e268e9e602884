"""Metadata: ``sat metadata`` (``apply``), its decisions (``plan``), atomic file writes (``files``),
the metadata_writes table (``table``), the fields sat writes (``xmp``) and one exiftool per batch."""
