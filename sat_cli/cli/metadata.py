"""`sat metadata`: write stored captions into XMP sidecars or the photos themselves, or take them back."""

from __future__ import annotations

import sys

import click

from ..errors import SatError


@click.command()
@click.argument("db_path", type=click.Path(dir_okay=False))
@click.option("--sidecar", is_flag=True, help="Write XMP sidecars beside the photos (the default).")
@click.option("--sidecar-name", type=click.Choice(["full", "stem"]), default="full", show_default=True,
              help="full: photo.jpg.xmp (digiKam, darktable, Immich); stem: photo.xmp (Lightroom, Capture One).")
@click.option("--embed", is_flag=True,
              help="Write into the photo files themselves (JPEG, TIFF, PNG, HEIC, DNG): each file is REWRITTEN "
                   "(metadata only; pixels stay bit-identical). Use --backup to keep the originals.")
@click.option("--backup", is_flag=True, help="Keep the original of every file sat rewrites as FILE_original.")
@click.option("--overwrite", is_flag=True,
              help="Replace descriptions sat did not write (a person's). Without it such photos are skipped.")
@click.option("--dry-run", is_flag=True, help="Say what would change; change nothing.")
@click.option("--remove", is_flag=True,
              help="Take back what sat wrote, and only that: restore what it replaced, delete sidecars it created.")
@click.option("--run", type=int, help="Write the captions of this run's model and settings (default: the newest per photo).")
@click.option("--list", "list_writes", is_flag=True, help="Print what sat wrote where (JSON Lines), change nothing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def metadata(db_path, sidecar, sidecar_name, embed, backup, overwrite, dry_run, remove, run, list_writes, quiet):
    """Put the stored captions where photo managers show them: the best caption becomes the
    photo's description (XMP dc:description, tiff/EXIF ImageDescription, IPTC Caption-Abstract
    when embedding), with a small provenance record in sat's own XMP namespace.

    A photo that already has a description sat did not write keeps it and is reported as
    skipped (--overwrite replaces it). A description sat wrote earlier is updated when the stored
    caption changes. Existing sidecars are merged (exiftool), never replaced; every write goes to
    a temporary file renamed over the old one.

    \b
    Exit status: 0 done (skipped photos included), 1 some files could not be written (or,
    with --remove, photos were missing: their records are kept for a later --remove), 2 usage
    error.

    \b
    Examples:
      sat metadata pics.db --sidecar
      sat metadata pics.db --sidecar --sidecar-name stem
      sat metadata pics.db --embed --backup
      sat metadata pics.db --sidecar --dry-run
      sat metadata pics.db --remove
    """
    from ..metadata.apply import MetadataOptions, remove_metadata, report, write_metadata
    from ..progress import console

    if list_writes:
        _print_listing(db_path)
        return
    if sidecar and embed and not remove:
        raise SatError("Choose --sidecar or --embed (run twice for both)")
    if sidecar_name != "full" and embed:
        raise SatError("--sidecar-name applies to sidecars, not to --embed")
    options = MetadataOptions(kind="embed" if embed else "sidecar", naming=sidecar_name, backup=backup,
                              dry_run=dry_run, overwrite=overwrite, quiet=quiet)
    if remove:
        kinds = tuple(k for k, given in (("sidecar", sidecar), ("embed", embed)) if given) or ("sidecar", "embed")
        summary = remove_metadata(db_path, options, kinds=kinds)
    else:
        summary = write_metadata(db_path, options, run=run)
    if not quiet:
        report(summary, options, console, verb="taken back" if remove else "to write")
    sys.exit(summary.exit_code)


def _print_listing(db_path: str) -> None:
    import json

    from ..metadata.table import listing
    from ..store.writes import open_db

    for row in listing(open_db(db_path, must_exist=True)):
        click.echo(json.dumps(row, ensure_ascii=False))
