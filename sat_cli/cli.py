"""The ``sat`` command line. Thin: options in, one call to the function that does the work."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import SatError


class UserError(click.ClickException):
    exit_code = 2  # like click's usage errors: the command could not start


class SatGroup(click.Group):
    """Turns SatError into a clean message (no traceback) and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SatError as exc:
            raise UserError(str(exc)) from exc


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


def _decode_settings(checkpoint, beam, n_best, max_len, length_penalty, no_repeat_ngram):
    from .beam import DecodeSettings

    defaults = checkpoint.decode_defaults()
    pick = lambda given, name, fallback: given if given is not None else defaults.get(name, fallback)  # noqa: E731
    try:
        return DecodeSettings(
            beam_size=pick(beam, "beam_size", 3),
            n_best=n_best,
            max_len=pick(max_len, "max_len", 50),
            length_penalty=pick(length_penalty, "length_penalty", 0.0),
            no_repeat_ngram=pick(no_repeat_ngram, "no_repeat_ngram", 0),
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def decode_options(fn):
    """--beam, --n-best, --max-len, --length-penalty, --no-repeat-ngram (shared by caption and eval)."""
    options = [
        click.option("--beam", type=click.IntRange(1), help="Beam size (default: the model's, else 3)."),
        click.option("--n-best", type=click.IntRange(1),
                     help="Hypotheses to keep per image, at most the beam size (default: the whole beam)."),
        click.option("--max-len", type=click.IntRange(1), help="Most words per caption (default 50)."),
        click.option("--length-penalty", type=float,
                     help="alpha in score = logprob / length**alpha; 0 ranks by log-probability (default: the model's, else 0)."),
        click.option("--no-repeat-ngram", type=click.IntRange(0),
                     help="Never repeat an n-gram of this size within a caption; 0 turns it off."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--db", "db_path", default="sat.db", show_default=True, type=click.Path(dir_okay=False),
              help="SQLite database to write (created if missing).")
@click.option("--model", "model_path", type=click.Path(),
              help="Checkpoint folder (model.safetensors + config.json). Default: the model shipped with sat.")
@click.option("--encoder-weights", type=click.Path(exists=True, dir_okay=False),
              help="Local file with the encoder's pretrained weights, for machines without internet.")
@decode_options
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Images per batch.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda", "mps"]),
              help="auto picks CUDA, then MPS, then the CPU.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
              help="Encoder precision; auto is bf16/fp16 autocast on CUDA and fp32 elsewhere.")
@click.option("--workers", type=click.IntRange(0),
              help="Image-decoding worker processes (default: one per spare core, up to 8; 0 decodes in-process).")
@click.option("--force", is_flag=True, help="Caption again images already captioned with this model and settings.")
@click.option("--no-attention", is_flag=True, help="Do not store the per-word attention maps.")
@click.option("--no-recursive", is_flag=True, help="Do not descend into subfolders.")
@click.option("--print", "print_captions", is_flag=True, help="Also write 'path<TAB>best caption' lines to stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def caption(paths, db_path, model_path, encoder_weights, beam, n_best, max_len, length_penalty, no_repeat_ngram,
            batch_size, device, precision, workers, force, no_attention, no_recursive, print_captions, quiet):
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
      sat caption ./photos --beam 5 --n-best 3 --length-penalty 0.7 --db out.db
      sat caption 'scans/**/*.tif' --device cuda --batch-size 64 --db out.db --print
      torchrun --nproc-per-node 4 -m sat_cli caption ./photos --db out.db
    """
    from .captioning import CaptionOptions, caption_files
    from .checkpoint import load_checkpoint
    from .progress import console

    checkpoint = load_checkpoint(model_path, encoder_weights=encoder_weights)
    if n_best is not None and beam is None and n_best > checkpoint.decode_defaults().get("beam_size", 3):
        beam = n_best
    settings = _decode_settings(checkpoint, beam, n_best, max_len, length_penalty, no_repeat_ngram)
    options = CaptionOptions(batch_size=batch_size, device=device, precision=precision, workers=workers,
                             force=force, attention=not no_attention, recursive=not no_recursive, quiet=quiet)

    def show(record):
        if record.captions:
            click.echo(f"{record.path}\t{record.captions[0].text}")

    summary = caption_files(list(paths), db_path, checkpoint, settings, options,
                            on_image=show if print_captions else None)
    if not quiet:
        rate = summary.captioned / summary.seconds if summary.seconds else 0.0
        console.print(
            f"{'Interrupted: ' if summary.interrupted else ''}[bold]{summary.captioned}[/] captioned, "
            f"{summary.skipped} skipped (already stored), "
            f"[{'red' if summary.failed else 'green'}]{summary.failed} failed[/] "
            f"in {summary.seconds:.1f}s ({rate:.1f} images/s) -> {db_path} (run {summary.run_id})"
        )
        for path, error in summary.failures[:10]:
            console.print(f"  [red]failed[/] {path}: {error}", highlight=False)
        if summary.failed > 10:
            console.print(f"  ... and {summary.failed - 10} more: sat export {db_path} --format csv | grep failed")
    if summary.interrupted:
        sys.exit(130)
    sys.exit(1 if summary.failed else 0)


@cli.command()
@click.argument("db_path", type=click.Path(dir_okay=False))
@click.option("-f", "--format", "fmt", default="csv", show_default=True,
              type=click.Choice(["csv", "tsv", "json", "jsonl", "coco"]), help="Output format.")
@click.option("-o", "--out", type=click.Path(dir_okay=False), help="Write to this file instead of stdout.")
@click.option("--best", is_flag=True, help="Only the best caption (rank 1) of each image.")
@click.option("--run", type=int, help="Only the captions (and failures) of this run id.")
@click.option("--no-failed", is_flag=True, help="Leave out files that could not be read.")
@click.option("--attention", is_flag=True, help="Include the per-word attention maps (json and jsonl only).")
def export(db_path, fmt, out, best, run, no_failed, attention):
    """Write the stored captions as CSV, TSV, JSON, JSON Lines or COCO results.

    csv/tsv: one row per caption (path, sha256, width, height, run, rank, caption, score,
    logprob, finished, status, error). json/jsonl: one object per image and model, with its
    n-best captions (and, with --attention, their maps). coco: [{"image_id", "caption"}] with
    the best caption, image_id taken from the number at the end of the file name.

    \b
    Examples:
      sat export out.db --format csv > captions.csv
      sat export out.db --format jsonl --best --attention -o captions.jsonl
      sat export out.db --format coco --run 2 -o results.json
    """
    from .export import export as run_export
    from .store import open_db

    if attention and fmt not in ("json", "jsonl"):
        raise click.BadParameter("--attention works with --format json or jsonl", param_hint="--attention")
    db = open_db(db_path, must_exist=True)
    chunks = run_export(db, fmt, run=run, best=best, failed=not no_failed, attention=attention)
    if out:
        with open(out, "w", encoding="utf-8", newline="") as f:
            for chunk in chunks:
                f.write(chunk)
    else:
        for chunk in chunks:
            sys.stdout.write(chunk)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def encoders(as_json):
    """List the encoder families (spec prefixes), the plugin that gives each, and offline weights.

    An encoder is named prefix:model, e.g. timm:tf_efficientnet_lite0, torchvision:resnet101,
    vit:vit_base_patch16_224. Third-party packages add families through the 'sat_cli' entry
    point group.
    """
    import json

    from .encoders import families, offline_weights

    fams = families()
    offline = offline_weights()
    if as_json:
        click.echo(json.dumps([
            {"prefix": f.prefix, "plugin": f.plugin, "description": f.description, "examples": list(f.examples)}
            for f in fams.values()
        ] + [{"offline_weights": spec, "source": src} for spec, (_, src) in offline.items()], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Encoders")
    for column in ("prefix", "plugin", "description", "examples"):
        table.add_column(column)
    for f in fams.values():
        table.add_row(f.prefix, f.plugin, f.description, "\n".join(f.examples))
    console = Console()
    console.print(table)
    if offline:
        console.print("Offline ImageNet weights: " + ", ".join(f"{spec} ({src})" for spec, (_, src) in offline.items()))
