"""``sat train``, ``sat average``, ``sat eval``: the commands that make and measure models. The
options of `sat train` are built from :class:`~sat_cli.training.config.TrainConfig`, the one
place their defaults are written."""

from __future__ import annotations

import sys
import typing
from dataclasses import MISSING, fields

import click

from .options import DEVICE, PRECISION, decode_options, settings_for


def _option_for(f):
    """A `sat train` option (a click.option decorator) built from a TrainConfig field and its
    metadata (training.config.opt)."""
    meta, default = f.metadata, f.default if f.default is not MISSING else None
    name = "--" + f.name.replace("_", "-")
    if "flag" in meta:  # a switch that sets the field to the opposite of its default
        decls = (["-q"] if f.name == "quiet" else []) + ["--" + meta["flag"], "flag_" + f.name]
        return click.option(*decls, is_flag=True, help=meta["help"])
    base = typing.get_args(f.type) or (f.type,)
    kind = next((t for t in base if t is not type(None)), str)
    if isinstance(kind, str):  # postponed annotations: "int | None"
        kind = {"int": int, "float": float}.get(kind.split("|")[0].strip(), str)
    if meta.get("ints"):
        ptype = click.STRING
    elif "choices" in meta:
        ptype = click.Choice(list(meta["choices"]))
    elif "min" in meta or "max" in meta:
        ptype = (click.IntRange if kind is int else click.FloatRange)(meta.get("min"), meta.get("max"))
    elif meta.get("folder"):
        ptype = click.Path(file_okay=False)
    elif meta.get("file") or meta.get("exists"):
        ptype = click.Path(exists=bool(meta.get("exists")), dir_okay=not meta.get("file"))
    else:
        ptype = kind if kind in (int, float) else click.STRING
    callback = (lambda ctx, param, value: _int_list(value, param)) if meta.get("ints") else None
    return click.option(name, f.name, type=ptype, default=default, show_default=default is not None,
                        help=meta["help"], metavar=meta.get("metavar"), callback=callback)


def _int_list(value, param):
    """'4,-1' -> [4, -1] (None stays None)."""
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 4,-1, not {value!r}", param=param) from None


def train_options(fn):
    """Every TrainConfig field as an option of `sat train`: the config is the one source of defaults."""
    from ..training.config import TrainConfig

    for f in reversed(fields(TrainConfig)):
        if f.metadata.get("cli", True):
            fn = _option_for(f)(fn)
    return fn


def config_from_options(options: dict):
    """TrainConfig from `sat train`'s parsed options (switches flip their field's default)."""
    from ..training import TrainConfig

    values = {}
    for f in fields(TrainConfig):
        if "flag" in f.metadata:
            values[f.name] = (not f.default) if options.pop("flag_" + f.name) else f.default
        elif f.name in options:
            values[f.name] = options.pop(f.name)
    return TrainConfig(**values)


@click.command()
@train_options
@click.option("--resume", "resume_dir", type=click.Path(exists=True, file_okay=False),
              help="Continue the run in this folder exactly where it stopped (other options are taken from it; "
                   "--epochs may raise the total).")
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
      sat train --data captions.json --attention hard --feature-layers 4,-1 --out runs/hard
      sat train --resume runs/b3
      torchrun --nproc-per-node 4 -m sat_cli train --data dataset_coco.json --images ./coco --out runs/b3
    """
    from ..runtime import Dist, keep_freed_memory
    from ..training import TrainConfig, report
    from ..training import train as run_training

    ctx = click.get_current_context()
    given = config_from_options(options)
    if resume_dir:
        cfg = TrainConfig.load(resume_dir)
        if ctx.get_parameter_source("epochs") == click.core.ParameterSource.COMMANDLINE:
            cfg.epochs = given.epochs
        cfg.quiet = given.quiet
    else:
        if not given.data:
            raise click.UsageError("--data is required (or --resume RUN_FOLDER)")
        cfg = given
    keep_freed_memory()
    summary = run_training(cfg, resume=bool(resume_dir))
    if Dist().main and not cfg.quiet:
        report(cfg, summary)
    if summary["stopped"]:
        sys.exit(130)


@click.command()
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
    from ..model.checkpoint import average_checkpoints

    path = average_checkpoints(list(checkpoints), out, half=half)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    click.echo(f"Averaged {len(checkpoints)} checkpoints into {path} ({size / 1e6:.1f} MB)", err=True)


@click.command(name="eval")
@click.argument("db_path", required=False, type=click.Path(dir_okay=False))
@click.option("--model", "model_path", type=click.Path(), help="Checkpoint to evaluate (default: the shipped model).")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), help="Caption file with the split to score.")
@click.option("--images", type=click.Path(file_okay=False), help="Image folder of --data.")
@click.option("--split", default="val", show_default=True, help="Split of --data to decode and score.")
@click.option("--references", type=click.Path(exists=True, dir_okay=False),
              help="With a DB: the caption file whose human captions are the references.")
@click.option("--run", type=int, help="With a DB: score the captions of this run.")
@decode_options
@click.option("--device", default="auto", show_default=True, type=DEVICE)
@click.option("--precision", default="auto", show_default=True, type=PRECISION)
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Feature cache folder.")
@click.option("--no-cache", is_flag=True, help="Encode the images without the feature cache.")
@click.option("--no-meteor", is_flag=True, help="Skip METEOR.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("-q", "--quiet", is_flag=True)
def eval_command(db_path, model_path, data, images, split, references, run, device, precision, cache_dir, no_cache,
                 no_meteor, as_json, quiet, **decode):
    """Score captions with BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap).

    Either decode a split of a caption file with a model, or score captions already stored
    in a database (DB_PATH) against the human captions of --references, matched by path or
    file name. Images of several collections (a Karpathy file's "source", e.g. coco and
    flickr8k) are also scored per collection.

    \b
    Examples:
      sat eval --model runs/b3/best --data dataset_coco.json --split test --beam 3
      sat eval --data captions.json --n-best 5 --json
      sat eval out.db --references dataset_coco.json
    """
    from ..evaluation.evaluate import evaluate, print_scores
    from ..runtime import keep_freed_memory

    if db_path and not references:
        raise click.UsageError("scoring a database needs --references CAPTION_FILE")
    if not db_path and not data:
        raise click.UsageError("give a DB_PATH with --references, or --data with a split to decode")
    keep_freed_memory()
    source, rows = evaluate(db_path, model_path=model_path, data=data, images=images, split=split,
                            references=references, run=run, device=device, precision=precision, cache_dir=cache_dir,
                            use_cache=not no_cache, meteor=not no_meteor, quiet=quiet,
                            settings_from=lambda checkpoint: settings_for(checkpoint.decode_defaults(), decode))
    print_scores(source, rows, as_json)
