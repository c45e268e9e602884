"""Storage: the SQLite schema (``migrations``), writes (``writes``), every read (``queries``), ``sat merge``."""
