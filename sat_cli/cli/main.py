"""The ``sat`` command line. Thin: options in, one call to the function that does the work."""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import SatError
from . import importer as cli_import
from . import metadata as cli_metadata
from . import models as cli_models
from . import serve as cli_serve
from .options import DEVICE, PRECISION, decode_options, settings_for


class UserError(click.ClickException):
    exit_code = 2  # like click's usage errors: the command could not start


class SatGroup(click.Group):
    """Turns SatError into a clean message (no traceback) and exit status 2."""

    def invoke(self, ctx):
        import sqlite3

        try:
            return super().invoke(ctx)
        except SatError as exc:
            raise UserError(str(exc)) from exc
        except KeyboardInterrupt:  # Ctrl-C before a command's own handling (loading the model): 130
            click.echo("Interrupted.", err=True)
            raise click.exceptions.Exit(130) from None
        except sqlite3.DatabaseError as exc:  # a read that met a damaged or locked database
            from ..store.writes import storage_error

            raise UserError(str(storage_error(exc, "the database"))) from exc


@click.group(cls=SatGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sat")
def cli():
    """Caption whole folders of photos with a Show, Attend and Tell model.

    A CNN or ViT turns each image into a grid of features, a soft-attention LSTM writes the
    caption word by word, and beam search picks the best sentence. Captions, scores, the
    n-best list and per-word attention maps go into an SQLite database.

    \b
    Examples:
      sat caption ./photos --db out.db
      sat caption a.jpg 'more/**/*.webp' --beam 5 --n-best 3 --db out.db
      sat export out.db --format csv > captions.csv
      sat encoders
    """


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--db", "db_path", default="sat.db", show_default=True, type=click.Path(dir_okay=False),
              help="SQLite database to write (created if missing).")
@click.option("--model", "model_path", type=click.Path(),
              help="Checkpoint folder (model.safetensors + config.json). Default: the model shipped with sat.")
@click.option("--encoder-weights", type=click.Path(exists=True, dir_okay=False),
              help="Local file with the encoder's pretrained weights, for machines without internet.")
@decode_options
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1),
              help="Images per batch: beam search decodes a batch at once (on the CPU the encoder takes it in "
                   "chunks of 8); a run killed mid-way loses at most one batch.")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help="auto picks CUDA, then MPS, then the CPU.")
@click.option("--precision", default="auto", show_default=True, type=PRECISION,
              help="Encoder precision; auto is fp16 autocast on CUDA and fp32 elsewhere (fp32 on CUDA turns TF32 off).")
@click.option("--workers", type=click.IntRange(0),
              help="Image-decoding worker processes (default: one per spare core, up to 8; 0 decodes in-process).")
@click.option("--force", is_flag=True, help="Caption again images already captioned with this model and settings.")
@click.option("--rehash", is_flag=True,
              help="Read and hash every file, even those unchanged (size, mtime, ctime, inode) since the last run.")
@click.option("--no-attention", is_flag=True, help="Do not store the per-word attention maps.")
@click.option("--no-recursive", is_flag=True, help="Do not descend into subfolders.")
@click.option("--read-timeout", default=60.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds a single file may take to read before it is given up as failed (a dead network mount).")
@click.option("--db-timeout", default=60.0, show_default=True, type=click.FloatRange(0),
              help="Seconds to wait while another program holds the database's write lock.")
@click.option("--print", "print_captions", is_flag=True,
              help="Also write 'path<TAB>best caption' lines to stdout (paths escaped as in TSV exports).")
@click.option("--xmp", is_flag=True,
              help="Then write each photo's best caption into an XMP sidecar (photo.jpg.xmp), merged into an existing "
                   "one; a description sat did not write is kept (see sat metadata).")
@click.option("--xmp-name", type=click.Choice(["full", "stem"]), default="full", show_default=True,
              help="Sidecar names for --xmp: full photo.jpg.xmp, stem photo.xmp (Lightroom, Capture One).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def caption(paths, db_path, model_path, encoder_weights, batch_size, device, precision, workers, force, rehash, no_attention,
            no_recursive, read_timeout, db_timeout, print_captions, xmp, xmp_name, quiet, **decode):
    """Caption images and store the results in an SQLite database.

    PATHS are image files, folders (walked recursively, image extensions only, hidden entries
    skipped) and glob patterns such as 'photos/**/*.jpg' (quote them).

    Each image is keyed by its content (sha256), the model and the decode settings, so a rerun
    skips what is already stored; --force redoes it. Every batch is written in one transaction:
    a run that is killed loses at most the batch in flight. Files that cannot be read are stored
    as failed rows with the reason, and the run goes on.

    \b
    Exit status: 0 all images captioned (or already stored), 1 some files failed,
    2 usage error (bad option, missing model), 130 interrupted (Ctrl-C or SIGTERM).

    \b
    Examples:
      sat caption ./photos --db out.db
      sat caption ~/Pictures --db pics.db --xmp
      sat caption ./photos --beam 5 --n-best 3 --length-penalty 0.7 --db out.db
      sat caption 'scans/**/*.tif' --device cuda --batch-size 256 --db out.db --print
      torchrun --nproc-per-node 4 -m sat_cli caption ./photos --db out.db
    """
    from ..api import load
    from ..captioning import report
    from ..progress import console
    from ..runtime import keep_freed_memory

    keep_freed_memory()
    cap = load(model_path, device=device, precision=precision, encoder_weights=encoder_weights, lazy=True)
    settings = settings_for(cap.model.decode_defaults(), decode)

    from ..inputs.paths import tsv_field

    def show(result):  # one line per image whatever its name holds (TSV escapes, as sat export)
        if result.captions:
            click.echo(f"{tsv_field(result.path)}\t{result.captions[0].text}")

    summary = cap.to_db(db_path, list(paths), settings=settings, batch_size=batch_size, workers=workers,
                        attention=not no_attention, recursive=not no_recursive, force=force, progress=not quiet,
                        on_result=show if print_captions else None, read_timeout=read_timeout,
                        db_timeout=db_timeout, rehash=rehash)
    if not summary.writer:  # torchrun's other ranks: rank 0 reports the run and writes the sidecars
        sys.exit(summary.exit_code)
    if not quiet:
        report(summary, db_path, console)
    if xmp and not summary.interrupted:  # the sidecars of this run's photos (sat metadata does the rest)
        from ..metadata.apply import sidecars_after_caption

        sys.exit(max(summary.exit_code, sidecars_after_caption(db_path, summary.run_id, xmp_name, quiet, console)))
    sys.exit(summary.exit_code)


@cli.command()
@click.argument("db_path", type=click.Path(dir_okay=False))
@click.option("-f", "--format", "fmt", default="csv", show_default=True,
              type=click.Choice(["csv", "tsv", "json", "jsonl", "coco", "html"]), help="Output format.")
@click.option("-o", "--out", type=click.Path(),
              help="Write to this file instead of stdout (html: the gallery folder, required).")
@click.option("--best", is_flag=True, help="Only the best caption (rank 1) of each image.")
@click.option("--run", type=int, help="Only the captions (and failures) of this run id.")
@click.option("--no-failed", is_flag=True, help="Leave out files that could not be read.")
@click.option("--attention", is_flag=True, help="Include the per-word attention maps (json and jsonl only).")
@click.option("--metadata", is_flag=True,
              help="Include what `sat metadata` wrote for each image: file, kind, status, caption, dates (json, jsonl).")
@click.option("--page-size", default=100, show_default=True, type=click.IntRange(1), help="html: images per page.")
@click.option("-q", "--quiet", is_flag=True, help="html: no progress bar.")
def export(db_path, fmt, out, best, run, no_failed, attention, metadata, page_size, quiet):
    """Write the stored captions as CSV, TSV, JSON, JSON Lines, COCO results or an HTML gallery.

    csv/tsv: one row per caption (path, sha256, width, height, run, rank, caption, score,
    logprob, finished, status, error). json/jsonl: one object per image and model, with its
    n-best captions (and, with --attention, their maps) and its image_id. coco: [{"image_id",
    "caption"}] with the best caption; image_id is the number a COCO-style file name ends with
    (COCO_val2014_000000000042.jpg -> 42) when every image in the database has a distinct one,
    else the image's row id (json/jsonl map each image_id to its path). html: a
    static gallery folder (index.html, thumbnails, pages loaded on demand) that opens from disk:
    hover or click a word to see where the model looked.

    \b
    Examples:
      sat export out.db --format csv > captions.csv
      sat export out.db --format jsonl --best --attention -o captions.jsonl
      sat export out.db --format coco --run 2 -o results.json
      sat export out.db --format html --out gallery/
    """
    from ..views.export import export_to

    export_to(db_path, fmt, out, run=run, best=best, failed=not no_failed, attention=attention, page_size=page_size,
              quiet=quiet, metadata=metadata)


@cli.command()
@click.argument("db_path", type=click.Path(dir_okay=False))
@click.argument("image")
@click.option("-o", "--out", type=click.Path(dir_okay=False),
              help="PNG to write (default: <image name>.attention.png in the current folder).")
@click.option("--rank", default=1, show_default=True, type=click.IntRange(1), help="Which n-best caption to show.")
@click.option("--run", type=int, help="Use the captions of this run (default: the newest).")
@click.option("--columns", default=5, show_default=True, type=click.IntRange(1), help="Panels per row.")
@click.option("--panel", default=224, show_default=True, type=click.IntRange(32), help="Panel size in pixels.")
def show(db_path, image, out, rank, run, columns, panel):
    """Draw where the model looked: the image with its caption, then each word over the image
    with its attention map (upsampled, smoothed, overlaid), as in the paper's figures.

    IMAGE is a stored path (full, relative or a unique tail such as photos/dog.jpg), a sha256
    prefix (4+ hex digits) or an image row id; id:N and sha:PREFIX say which is meant. An IMAGE
    that matches different images (a row id and a hash prefix) is an error listing them. Works
    headless: it writes a PNG.

    \b
    Examples:
      sat show out.db photos/dog.jpg --out dog.png
      sat show out.db 3f2a --rank 2
      sat show out.db id:9
    """
    from ..progress import console
    from ..views.show import show as run_show

    from rich.markup import escape

    from ..inputs.paths import printable

    target, cap, words = run_show(db_path, image, out, rank=rank, run=run, columns=columns, panel=panel)
    console.print(f"{escape(printable(target))}: {cap['text']!r} ({len(words)} words, run {cap['run_id']})",
                  highlight=False)


@cli.command()
@click.argument("db_path", type=click.Path(dir_okay=False))
@click.argument("query")
@click.option("-n", "--limit", default=20, show_default=True, type=click.IntRange(1))
@click.option("--run", type=int, help="Only captions of this run.")
@click.option("--rank", type=click.IntRange(1), help="Only this n-best rank (1 = best captions).")
@click.option("--json", "as_json", is_flag=True, help="JSON array on stdout.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout.")
def search(db_path, query, limit, run, rank, as_json, as_csv):
    """Full-text search over stored captions, best matches first (SQLite FTS5, bm25; words are
    stemmed, so 'dog' finds 'dogs').

    \b
    QUERY syntax: words (all must match), "exact phrase", AND / OR / NOT, prefix*.
    Examples:
      sat search out.db 'dog AND frisbee' --limit 20
      sat search out.db '"red bus" OR tram' --rank 1 --json
    """
    from ..store.queries import search as run_search
    from ..store.writes import open_db
    from ..views.search import print_matches

    rows = run_search(open_db(db_path, must_exist=True), query, limit=limit, run=run, rank=rank)
    print_matches(rows, query, "json" if as_json else "csv" if as_csv else "table")


@cli.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--into", required=True, type=click.Path(dir_okay=False), help="The database to merge into (created if missing).")
@click.option("-q", "--quiet", is_flag=True, help="No per-database lines.")
def merge(sources, into, quiet):
    """Merge databases captioned on separate machines (or runs) into one.

    Results are deduplicated by their usual key (image content, model, decode settings): when
    two databases captioned the same photo with the same model and settings, the first keeps
    its result. Runs are copied with where they came from (runs.merged_from); each image path
    keeps its most recent row. Each source is merged in one transaction, and merging the same
    database again adds nothing. The sources are only read.

    \b
    Examples:
      sat merge node1.db node2.db node3.db --into all.db
      sat merge laptop.db --into archive.db
    """
    from ..progress import console
    from ..store.merge import merge as run_merge
    from ..store.merge import report

    summary = run_merge(list(sources), into)
    if not quiet:
        report(summary, console)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def encoders(as_json):
    """List the encoder families (spec prefixes), the plugin that gives each, and offline weights.

    An encoder is named prefix:model, e.g. timm:tf_efficientnet_lite0, torchvision:resnet101,
    vit:vit_base_patch16_224. Third-party packages add families through the 'sat_cli' entry
    point group.
    """
    from ..model.encoders import print_families

    print_families(as_json)


for command in (cli_models.train, cli_models.average, cli_models.eval_command, cli_import.import_group,
                cli_metadata.metadata, cli_serve.serve):
    cli.add_command(command)
