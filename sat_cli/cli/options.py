"""Options and helpers that several `sat` commands share."""

from __future__ import annotations

import click

DEVICE = click.Choice(["auto", "cpu", "cuda", "mps"])
PRECISION = click.Choice(["auto", "fp32", "fp16", "bf16"])


def decode_options(fn):
    """--beam, --n-best, --max-len, --length-penalty, --no-repeat-ngram (shared by caption and eval)."""
    options = [
        click.option("--beam", type=click.IntRange(1), help="Beam size (default: the model's, else 3)."),
        click.option("--n-best", type=click.IntRange(1),
                     help="Hypotheses to keep per image, at most the beam size (default: the whole beam; "
                          "more than the model's beam widens it)."),
        click.option("--max-len", type=click.IntRange(1), help="Most words per caption (default: the model's, else 50)."),
        click.option("--length-penalty", type=float,
                     help="alpha in score = logprob / length**alpha; 0 ranks by log-probability (default: the model's, else 0)."),
        click.option("--no-repeat-ngram", type=click.IntRange(0),
                     help="Never repeat an n-gram of this size within a caption; 0 turns it off."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def settings_for(defaults: dict, decode: dict):
    """The decode settings of caption and eval (one rule: sat_cli.pipeline.decode_settings)."""
    from ..pipeline import decode_settings

    try:
        return decode_settings(defaults, **decode)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
