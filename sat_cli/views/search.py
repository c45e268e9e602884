"""``sat search``: full-text search over stored captions, printed as a table, JSON or CSV
(the query itself is :func:`sat_cli.queries.search`)."""

from __future__ import annotations

import json
import sys

COLUMNS = ["path", "rank", "caption", "score", "run", "relevance", "image_id"]


def print_matches(rows: list[dict], query: str, fmt: str = "table") -> None:
    """Matches on stdout: a rich table, a JSON array or CSV."""
    rows = [{k: v for k, v in r.items() if k != "path_bytes"} for r in rows]
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    elif fmt == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{len(rows)} match{'es' if len(rows) != 1 else ''} for {query!r}")
        for col in ("path", "rank", "caption", "score"):
            table.add_column(col, overflow="fold")
        from rich.markup import escape

        from ..inputs.paths import printable

        for r in rows:
            table.add_row(escape(printable(r["path"])), str(r["rank"]), r["caption"], f"{r['score']:.2f}")
        Console().print(table)
