"""The ``sat`` command line. Thin: options in, one call to the function that does the work."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

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


def _int_list(value, param):
    """'4,-1' -> [4, -1] (None stays None)."""
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 4,-1, not {value!r}", param=param) from None


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
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1),
              help="Images per batch: beam search decodes a batch at once (on the CPU the encoder takes it in "
                   "chunks of 8); a run killed mid-way loses at most one batch.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda", "mps"]),
              help="auto picks CUDA, then MPS, then the CPU.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
              help="Encoder precision; auto is fp16 autocast on CUDA and fp32 elsewhere (fp32 on CUDA turns TF32 off).")
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
      sat caption 'scans/**/*.tif' --device cuda --batch-size 256 --db out.db --print
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
              type=click.Choice(["csv", "tsv", "json", "jsonl", "coco", "html"]), help="Output format.")
@click.option("-o", "--out", type=click.Path(),
              help="Write to this file instead of stdout (html: the gallery folder, required).")
@click.option("--best", is_flag=True, help="Only the best caption (rank 1) of each image.")
@click.option("--run", type=int, help="Only the captions (and failures) of this run id.")
@click.option("--no-failed", is_flag=True, help="Leave out files that could not be read.")
@click.option("--attention", is_flag=True, help="Include the per-word attention maps (json and jsonl only).")
@click.option("--page-size", default=100, show_default=True, type=click.IntRange(1), help="html: images per page.")
@click.option("-q", "--quiet", is_flag=True, help="html: no progress bar.")
def export(db_path, fmt, out, best, run, no_failed, attention, page_size, quiet):
    """Write the stored captions as CSV, TSV, JSON, JSON Lines, COCO results or an HTML gallery.

    csv/tsv: one row per caption (path, sha256, width, height, run, rank, caption, score,
    logprob, finished, status, error). json/jsonl: one object per image and model, with its
    n-best captions (and, with --attention, their maps). coco: [{"image_id", "caption"}] with
    the best caption, image_id taken from the number at the end of the file name. html: a
    static gallery folder (index.html, thumbnails, pages loaded on demand) that opens from disk:
    hover or click a word to see where the model looked.

    \b
    Examples:
      sat export out.db --format csv > captions.csv
      sat export out.db --format jsonl --best --attention -o captions.jsonl
      sat export out.db --format coco --run 2 -o results.json
      sat export out.db --format html --out gallery/
    """
    from .export import export as run_export
    from .store import open_db

    if attention and fmt not in ("json", "jsonl"):
        raise click.BadParameter("--attention works with --format json or jsonl", param_hint="--attention")
    db = open_db(db_path, must_exist=True)
    if fmt == "html":
        from .gallery import export_html
        from .progress import console

        if not out:
            raise click.BadParameter("--format html writes a folder: give it with --out", param_hint="--out")
        if run is not None and not db["runs"].count_where("id = ?", [run]):
            raise UserError(f"No run {run} in this database (see the runs table)")
        index = export_html(db, out, run=run, best=best, page_size=page_size, quiet=quiet,
                            title=f"sat: {Path(db_path).name}")
        if not quiet:
            console.print(f"Gallery written: {index}")
        return
    chunks = run_export(db, fmt, run=run, best=best, failed=not no_failed, attention=attention)
    if out:
        with open(out, "w", encoding="utf-8", newline="") as f:
            for chunk in chunks:
                f.write(chunk)
    else:
        for chunk in chunks:
            sys.stdout.write(chunk)


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
    prefix (6+ hex digits) or an image row id. Works headless: it writes a PNG.

    \b
    Examples:
      sat show out.db photos/dog.jpg --out dog.png
      sat show out.db 3f2a9c --rank 2
    """
    from .progress import console
    from .show import caption_with_attention, find_image, render
    from .store import open_db

    db = open_db(db_path, must_exist=True)
    row = find_image(db, image)
    cap, maps = caption_with_attention(db, row, rank=rank, run=run)
    words = json.loads(cap["tokens"])
    target = out or f"{Path(row['path']).stem}.attention.png"
    render(row["path"], words, maps, cap["text"], target, columns=columns, panel=panel,
           title=f"rank {rank}, score {cap['score']:.2f}")
    console.print(f"{target}: {cap['text']!r} ({len(words)} words, run {cap['run_id']})", highlight=False)


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
    from .search import search as run_search
    from .store import open_db

    db = open_db(db_path, must_exist=True)
    rows = run_search(db, query, limit=limit, run=run, rank=rank)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    elif as_csv:
        import csv

        writer = csv.DictWriter(sys.stdout, ["path", "rank", "caption", "score", "run", "relevance", "image_id"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{len(rows)} match{'es' if len(rows) != 1 else ''} for {query!r}")
        for col in ("path", "rank", "caption", "score"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(r["path"], str(r["rank"]), r["caption"], f"{r['score']:.2f}")
        Console().print(table)


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


@cli.command()
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              help="Captions: Karpathy-split JSON (dataset_coco.json ...), COCO captions_*.json or CSV (image,caption).")
@click.option("--images", type=click.Path(file_okay=False), help="Image folder (default: the caption file's folder).")
@click.option("--val-data", type=click.Path(exists=True, dir_okay=False),
              help="Separate validation captions, e.g. captions_val2017.json.")
@click.option("--val-images", type=click.Path(file_okay=False), help="Image folder of --val-data.")
@click.option("--out", default="runs/sat", show_default=True, type=click.Path(file_okay=False),
              help="Run folder: best/ and last/ checkpoints, metrics.jsonl, trainer state.")
@click.option("--encoder", default="timm:tf_efficientnet_lite0", show_default=True, help="Encoder spec (sat encoders).")
@click.option("--grid", type=click.IntRange(0), help="Pool the feature map to GRID x GRID (0: native map).")
@click.option("--image-size", type=click.IntRange(32), help="Encoder input size (default: the weights' own).")
@click.option("--encoder-weights", type=click.Path(exists=True, dir_okay=False), help="Local encoder weights file.")
@click.option("--feature-layers", callback=lambda ctx, param, value: _int_list(value, param),
              help="timm CNNs: encoder stages that form the grid, comma-separated: 0 (stride 2) .. 4 (stride 32) "
                   "and -1, the last feature map (default); several are pooled to the coarsest and concatenated, "
                   "e.g. 4,-1.")
@click.option("--embed-dim", default=512, show_default=True, type=click.IntRange(1))
@click.option("--attention-dim", default=512, show_default=True, type=click.IntRange(1))
@click.option("--decoder-dim", default=512, show_default=True, type=click.IntRange(1))
@click.option("--dropout", default=0.5, show_default=True, type=click.FloatRange(0, 1))
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=4e-4, show_default=True, type=float, help="Decoder learning rate (Adam).")
@click.option("--weight-decay", default=0.0, show_default=True, type=float)
@click.option("--fine-tune-encoder", type=click.IntRange(1), metavar="EPOCH",
              help="Train the encoder too from this epoch on (bypasses the feature cache).")
@click.option("--encoder-lr", default=1e-4, show_default=True, type=float)
@click.option("--attention-lambda", default=1.0, show_default=True, type=float,
              help="Weight of the doubly stochastic attention regularizer.")
@click.option("--attention", default="soft", show_default=True, type=click.Choice(["soft", "hard"]),
              help="soft: the context is the attention-weighted mean of the grid; hard: half of the captions "
                   "read one sampled cell per word, trained with REINFORCE (Xu et al. 2015).")
@click.option("--hard-reinforce", default=1.0, show_default=True, type=float,
              help="Hard attention: weight of the REINFORCE term (lambda_r).")
@click.option("--hard-entropy", default=0.001, show_default=True, type=float,
              help="Hard attention: weight of the entropy bonus on the attention (lambda_e).")
@click.option("--hard-inference", default="expected", show_default=True, type=click.Choice(["expected", "argmax"]),
              help="Hard attention at inference: the expected context or the single most likely cell.")
@click.option("--init-state", default="mean", show_default=True, type=click.Choice(["mean", "zero"]),
              help="The LSTM's first state: a projection of the mean feature (the paper's), or zero, so "
                   "everything the decoder sees comes through its attention.")
@click.option("--label-smoothing", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--grad-clip", default=5.0, show_default=True, type=float)
@click.option("--min-word-freq", default=5, show_default=True, type=click.IntRange(1))
@click.option("--max-caption-len", default=50, show_default=True, type=click.IntRange(1))
@click.option("--lr-decay", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Multiply learning rates by this when more than --lr-patience epochs in a row bring no improvement.")
@click.option("--lr-patience", default=2, show_default=True, type=click.IntRange(0))
@click.option("--early-stop", default=6, show_default=True, type=click.IntRange(1),
              help="Stop after this many epochs without improvement.")
@click.option("--metric", default="CIDEr", show_default=True,
              type=click.Choice(["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]),
              help="Validation metric that picks the best checkpoint.")
@click.option("--beam", default=3, show_default=True, type=click.IntRange(1), help="Beam size for validation.")
@click.option("--length-penalty", default=0.0, show_default=True, type=float)
@click.option("--val-max-len", default=50, show_default=True, type=click.IntRange(1))
@click.option("--val-fraction", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help="Share of a COCO/CSV file without splits held out for validation.")
@click.option("--no-meteor", is_flag=True, help="Skip METEOR (it needs Java and ~10 s per validation).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
              help="Mixed precision on CUDA (auto: bf16 where supported, else fp16 with loss scaling); fp32 elsewhere.")
@click.option("--workers", type=click.IntRange(0), help="Image-decoding worker processes.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Feature cache folder (default: $SAT_CACHE_DIR or ~/.cache/sat/features).")
@click.option("--half", is_flag=True, help="Store best/ in float16 (half the size).")
@click.option("--init-from", type=click.Path(exists=True),
              help="Start from this checkpoint's decoder (its encoder, vocabulary and sizes), e.g. to adapt "
                   "a model to your photos.")
@click.option("--scst-from", type=click.IntRange(1), metavar="EPOCH",
              help="From this epoch on, self-critical training: sample captions and follow the CIDEr-D reward.")
@click.option("--scst-samples", default=5, show_default=True, type=click.IntRange(2),
              help="Captions sampled per image in self-critical training.")
@click.option("--scst-lr", default=5e-5, show_default=True, type=float, help="Learning rate for self-critical training.")
@click.option("--scst-max-len", default=20, show_default=True, type=click.IntRange(1))
@click.option("--resume", "resume_dir", type=click.Path(exists=True, file_okay=False),
              help="Continue the run in this folder exactly where it stopped (other options are taken from it; "
                   "--epochs may raise the total).")
@click.option("-q", "--quiet", is_flag=True)
def train(resume_dir, **options):
    """Train the attention decoder on a caption data set.

    Frozen-encoder features are computed once and cached on disk; every epoch the model
    beam-decodes the validation split and is scored with BLEU-1..4, METEOR, ROUGE-L and CIDEr
    (pycocoevalcap); the best checkpoint by --metric is kept in OUT/best. Ctrl-C saves and
    exits; --resume OUT continues exactly. Several processes: torchrun.

    \b
    Examples:
      sat train --data dataset_coco.json --images ./coco --encoder timm:efficientnet_b3 --out runs/b3
      sat train --data captions.csv --images ./photos --encoder torchvision:resnet101 --fine-tune-encoder 5
      sat train --resume runs/b3
      torchrun --nproc-per-node 4 -m sat_cli train --data dataset_coco.json --images ./coco --out runs/b3
    """
    import json
    from pathlib import Path

    from .progress import console
    from .train import CONFIG_FILE, TrainConfig, read_metrics
    from .train import train as run_training

    ctx = click.get_current_context()
    meteor = not options.pop("no_meteor")
    if resume_dir:
        saved = Path(resume_dir) / CONFIG_FILE
        if not saved.exists():
            raise click.UsageError(f"{resume_dir} is not a sat run folder ({CONFIG_FILE} is missing)")
        cfg = TrainConfig.from_dict(json.loads(saved.read_text()))
        cfg.out = resume_dir
        if ctx.get_parameter_source("epochs") == click.core.ParameterSource.COMMANDLINE:
            cfg.epochs = options["epochs"]
        cfg.quiet = options["quiet"]
    else:
        if not options.get("data"):
            raise click.UsageError("--data is required (or --resume RUN_FOLDER)")
        cfg = TrainConfig(meteor=meteor, **options)
    summary = run_training(cfg, resume=bool(resume_dir))
    if int(os.environ.get("RANK", 0)) != 0:
        return
    if not cfg.quiet:
        from .metrics import metrics_table

        rows = read_metrics(cfg.out)
        if rows:
            console.print(metrics_table(rows, title=f"{cfg.out}/metrics.jsonl"))
        if summary["stopped"]:
            console.print(f"Stopped. Continue with: sat train --resume {cfg.out}")
        else:
            console.print(f"Best {cfg.metric} {summary['best']:.2f} at epoch {summary['best_epoch']}: {cfg.out}/best")
    if summary["stopped"]:
        sys.exit(130)


@cli.command()
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the averaged checkpoint.")
@click.option("--half", is_flag=True, help="Store it in float16 (half the size).")
def average(checkpoints, out, half):
    """Average the weights of checkpoints of one model into a new checkpoint.

    Checkpoint averaging: the mean of nearby epochs of one run often captions better than
    any one of them. The checkpoints must share encoder, preprocessing, vocabulary and sizes.
    Score the result with `sat eval` before you use it.

    \b
    Examples:
      sat average runs/x/best runs/x/last --out runs/x/avg
      sat average runs/x/best runs/x/last --out runs/x/avg --half
    """
    from .checkpoint import average_checkpoints

    path = average_checkpoints(list(checkpoints), out, half=half)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    click.echo(f"Averaged {len(checkpoints)} checkpoints into {path} ({size / 1e6:.1f} MB)", err=True)


@cli.command(name="eval")
@click.argument("db_path", required=False, type=click.Path(dir_okay=False))
@click.option("--model", "model_path", type=click.Path(), help="Checkpoint to evaluate (default: the shipped model).")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), help="Caption file with the split to score.")
@click.option("--images", type=click.Path(file_okay=False), help="Image folder of --data.")
@click.option("--split", default="val", show_default=True, help="Split of --data to decode and score.")
@click.option("--references", type=click.Path(exists=True, dir_okay=False),
              help="With a DB: the caption file whose human captions are the references.")
@click.option("--run", type=int, help="With a DB: score the captions of this run.")
@decode_options
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda", "mps"]))
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "fp16", "bf16"]))
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Feature cache folder.")
@click.option("--no-cache", is_flag=True, help="Encode the images without the feature cache.")
@click.option("--no-meteor", is_flag=True, help="Skip METEOR.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("-q", "--quiet", is_flag=True)
def eval_command(db_path, model_path, data, images, split, references, run, beam, n_best, max_len, length_penalty,
                 no_repeat_ngram, device, precision, cache_dir, no_cache, no_meteor, as_json, quiet):
    """Score captions with BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap).

    Either decode a split of a caption file with a model, or score captions already stored
    in a database (DB_PATH) against the human captions of --references, matched by path or
    file name.

    \b
    Examples:
      sat eval --model runs/b3/best --data dataset_coco.json --split test --beam 3
      sat eval out.db --references dataset_coco.json
    """
    import json

    from .datasets import load_captions
    from .evaluate import db_captions, decode_split, match_references
    from .metrics import metrics_table, score_captions
    from .progress import console

    warn = (lambda m: None) if quiet else (lambda m: console.print(f"[yellow]{m}"))
    if db_path:
        if not references:
            raise click.UsageError("scoring a database needs --references CAPTION_FILE")
        refs_data = load_captions(references, images)
        refs, hyps = match_references(db_captions(db_path, run), refs_data.entries)
        if not hyps:
            raise click.UsageError(f"none of the images in {db_path} appear in {references}")
        source = f"{db_path} ({len(hyps)} images matched)"
    else:
        if not data:
            raise click.UsageError("give a DB_PATH with --references, or --data with a split to decode")
        from .checkpoint import load_checkpoint

        checkpoint = load_checkpoint(model_path)
        entries = load_captions(data, images).split(split)
        if not entries:
            raise click.UsageError(f"{data} has no images in split {split!r}")
        settings = _decode_settings(checkpoint, beam, n_best, max_len, length_penalty, no_repeat_ngram)
        hyps = decode_split(checkpoint, entries, settings, device, precision, cache_dir, not no_cache, quiet=quiet)
        refs = {e.path: e.raw for e in entries}
        source = f"{checkpoint.path} on {data} [{split}] ({len(hyps)} images, beam {settings.beam_size})"
    scores = score_captions(refs, hyps, meteor=not no_meteor, warn=warn)
    if as_json:
        click.echo(json.dumps({"source": source, "images": len(hyps), **{k: round(v, 3) for k, v in scores.items()}}))
    else:
        console.print(metrics_table([{"images": len(hyps), **scores}], title=source))
