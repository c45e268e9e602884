"""Caption metrics with pycocoevalcap, the reference implementation: BLEU-1..4, METEOR,
ROUGE-L and CIDEr. METEOR (and the PTB tokenizer) need Java; without it METEOR is skipped
with a warning and captions are tokenized like the Karpathy files ([a-z0-9]+ runs)."""

from __future__ import annotations

import contextlib
import io
import shutil
import sys

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def have_java() -> bool:
    return shutil.which("java") is not None


@contextlib.contextmanager
def _silence_stderr():
    """The Java tools print their progress on the inherited stderr; keep it off the user's screen."""
    import os

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tokenize(captions: dict, java: bool) -> dict:
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        with contextlib.redirect_stdout(io.StringIO()), _silence_stderr():
            return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    from ..model.vocab import tokenize

    return {k: [" ".join(tokenize(c)) for c in v] for k, v in captions.items()}


def score_captions(references: dict, hypotheses: dict, meteor: bool = True, warn=None) -> dict[str, float]:
    """references: id -> list of human captions; hypotheses: id -> one caption.
    Returns metric -> value in percent (BLEU-4 22.8 means 0.228)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = [k for k in hypotheses if k in references]
    if not ids:
        return {}
    java = have_java()
    refs = _tokenize({k: references[k] for k in ids}, java)
    hyps = _tokenize({k: [hypotheses[k]] for k in ids}, java)
    hyps = {k: [v[0] if v and v[0] else "<empty>"] for k, v in hyps.items()}
    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its internals
        bleu, _ = Bleu(4).compute_score(refs, hyps)
        for n, value in enumerate(bleu, start=1):
            out[f"BLEU-{n}"] = 100 * float(value)
        if meteor and java:
            from pycocoevalcap.meteor.meteor import Meteor

            with _silence_stderr():
                scorer = Meteor()
            out["METEOR"] = 100 * float(scorer.compute_score(refs, hyps)[0])
            with contextlib.suppress(Exception):
                scorer.close()
        out["ROUGE-L"] = 100 * float(Rouge().compute_score(refs, hyps)[0])
        out["CIDEr"] = 100 * float(Cider().compute_score(refs, hyps)[0])
    if meteor and not java:
        (warn or (lambda m: print(m, file=sys.stderr)))("METEOR skipped: Java is not installed (apt install default-jre-headless)")
    return out


def metrics_table(rows: list[dict], title: str = "", width: int = 80):
    """Rich tables: one row per entry (e.g. per epoch), one column per metric present. Columns
    that would not fit ``width`` (the terminal's) go into a further table that repeats the first
    column, so nothing is cut to "ep..." at 80 columns."""
    from rich.console import Group
    from rich.table import Table

    keys = [k for k in rows[0] if k not in METRICS] if rows else []
    columns = keys + [m for m in METRICS if any(m in r for r in rows)]
    cells = {c: [_fmt(r.get(c)) for r in rows] for c in columns}
    size = {c: max([len(c), *map(len, cells[c])]) + 3 for c in columns}  # padding and border
    chunks, current = [], columns[:1]
    for c in columns[1:]:
        if current and sum(size[x] for x in current) + size[c] + 1 > width and len(current) > 1:
            chunks.append(current)
            current = columns[:1]
        current.append(c)
    chunks.append(current)
    tables = []
    for i, chunk in enumerate(chunks):
        table = Table(title=(title or None) if i == 0 else None)
        for c in chunk:
            table.add_column(c, justify="right", no_wrap=True)
        for j in range(len(rows)):
            table.add_row(*[cells[c][j] for c in chunk])
        tables.append(table)
    return Group(*tables)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 0.01 else f"{value:.2f}"
    return str(value)
