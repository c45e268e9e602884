"""`sat import`: checkpoints of other Show, Attend and Tell code as sat checkpoints."""

from __future__ import annotations

import click


@click.group(name="import")
def import_group():
    """Convert a checkpoint trained with other Show, Attend and Tell code into a sat checkpoint
    folder, without running any code from the file.

    \b
    Examples:
      sat import sgrvinod BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar \\
          --word-map WORDMAP_coco_5_cap_per_img_5_min_word_freq.json --out models/sgrvinod
    """


@import_group.command(short_help="A checkpoint of sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning.")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--word-map", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The WORDMAP_*.json the model was trained with.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the sat checkpoint.")
@click.option("--half", is_flag=True, help="Store the weights in float16 (half the size; captions may differ).")
def sgrvinod(checkpoint, word_map, out, half):
    """A checkpoint of github.com/sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning
    (BEST_checkpoint_*.pth.tar, either torch.save format) and its word map.

    The pickled modules are read with inert stand-ins: only their tensors are kept, and a file
    that names anything else is refused. The sat checkpoint records his encoder (ResNet-101,
    14x14 grid, his fine-tuned weights), his preprocessing (256x256 bilinear resize, ImageNet
    mean/std) and his beam search (beam 5, nothing blocked, 50 words at most), so
    `sat caption --model OUT` writes the captions his caption.py does.

    \b
    Examples:
      sat import sgrvinod BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar \\
          --word-map WORDMAP_coco_5_cap_per_img_5_min_word_freq.json --out models/sgrvinod
      sat caption ./photos --model models/sgrvinod --db out.db
    """
    from ..importers import import_sgrvinod

    done = import_sgrvinod(checkpoint, word_map, out, half=half)
    size = sum(f.stat().st_size for f in done.path.iterdir() if f.is_file())
    about = [f"epoch {done.epoch}" if done.epoch is not None else "",
             f"BLEU-4 {done.bleu4:.4g} (his teacher-forced validation)" if done.bleu4 is not None else "",
             "fine-tuned encoder" if done.fine_tuned else ""]
    about = ", ".join(x for x in about if x)
    click.echo(f"Imported {checkpoint} into {done.path} ({size / 1e6:.1f} MB): {done.encoder_spec}, "
               f"{done.grid}x{done.grid} grid, {done.vocab_size} words" + (f"; {about}" if about else ""), err=True)
