"""The caption pipeline's own ceiling (issue 22, part 3): the real `caption_to_db` path (walk,
workers, batching, beam search, storage with attention maps, progress) with a null model plugged
in the way a third-party model would be: an encoder family ``null`` registered through the
``register_encoders`` hook (its encoder samples the uint8 pixels onto a 12 x 12 grid: no network),
and a decoder of the real class with tiny sizes (8-wide LSTM, 18 words) whose captions are always
10 words (3 hypotheses with attention maps per photo, as the default model stores).

    nice -n 15 .venv/bin/python bench/pipeline_bench.py [--photos 400] [--workers 2] [--batch 64]

Prints, for a run over COCO photos of ../shared/data:
- the main process's CPU milliseconds per image besides the model (time.process_time around
  `caption_to_db`, less the CPU of the encoder's forward and the tiny decoder's beam search, timed
  with the thread's clock inside the same run): what a GPU can never beat; steady, as the slope
  between a run of a quarter of the photos and one of all of them (workers' start and imports
  cancel); split by thread: the caption loop (the main thread, time.thread_time) and the threads
  beside it on another core (the SQLite writer, the progress bar's refresh);
- one loader worker: the dataset's read + hash + decode + resize per photo in this process, and a
  real DataLoader worker process (collate and the hand-off included; its CPU from getrusage), as
  CPU ms per photo and photos/s of wall time.
CPU figures hold on a busy machine; the wall figures do not (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
from sat_cli.model.hookspecs import hookimpl  # noqa: E402

WORDS = ["a", "man", "riding", "wave", "on", "top", "of", "surfboard", "dog", "cat", "with", "the", "in", "red"]


def load() -> str:
    return open("/proc/loadavg").read().split()[0]


class NullPlugin:
    """A plugin module's shape: one ``register_encoders`` hook implementation."""

    @staticmethod
    @hookimpl
    def register_encoders(register):
        from sat_cli.model.encoders import EncoderFamily

        register(EncoderFamily(prefix="null", build=build_null, description="no network: pixels sampled on a grid"))


def build_null(name: str, options):
    import torch

    from sat_cli.model.backbone import Encoder
    from sat_cli.model.encoders import Preprocess

    class NullEncoder(Encoder):
        def __init__(self, size: int):
            super().__init__(f"null:{name}", Preprocess(size=(size, size), mean=(0.5,) * 3, std=(0.5,) * 3), 3)
            self.backbone = torch.nn.Identity()
            self.stride = size // 12

        def grid_shape(self):
            return (self.preprocess.size[0] // self.stride, self.preprocess.size[1] // self.stride)

        def forward(self, images):
            return self.encode(images)

        def encode(self, images):  # (B, 3, H, W) uint8 -> (B, 144, 3): every stride-th pixel
            s = self.stride
            return images[:, :, ::s, ::s].flatten(2).transpose(1, 2).float() / 255.0

    return NullEncoder(options.image_size or 384).eval()


def null_model(size: int):
    """A Checkpoint of the null encoder (built through the plugin hook) and a tiny real decoder."""
    import torch

    from sat_cli.model.checkpoint import Checkpoint
    from sat_cli.model.decoder import Decoder, DecoderConfig
    from sat_cli.model.encoders import EncoderOptions, create_encoder
    from sat_cli.model.plugins import pm
    from sat_cli.model.vocab import SPECIALS, Vocab

    if pm.get_plugin("null-bench") is None:
        pm.register(NullPlugin, name="null-bench")
    encoder = create_encoder("null:grid12", EncoderOptions(image_size=size))
    torch.manual_seed(0)
    vocab = Vocab([*SPECIALS, *WORDS])
    decoder = Decoder(DecoderConfig(vocab_size=len(vocab), encoder_dim=3, embed_dim=8, attention_dim=8,
                                    decoder_dim=8)).eval()
    with torch.no_grad():
        decoder.fc.bias[vocab.end] = -1e4  # never ends: every caption is max_len words
    config = {"encoder": {"spec": encoder.spec}, "decode": {"beam_size": 3, "max_len": 10}}
    model = Checkpoint(encoder=encoder, decoder=decoder, vocab=vocab, config=config, fingerprint="null-bench",
                       path="null")
    return model.to(torch.device("cpu"))


def worker_rate(paths: list[str], preprocess) -> tuple[float, float]:
    """(CPU ms per photo, photos/s of wall time) of the dataset's work per photo in this process."""
    from sat_cli.inputs.images import Sources

    ds = Sources(preprocess.size, preprocess.interpolation)
    ds[(0, paths[0])]
    cpu, wall = time.process_time(), time.perf_counter()
    for i, p in enumerate(paths):
        ds[(i, p)]
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return 1000 * cpu / len(paths), len(paths) / wall


def loader_worker(paths: list[str], preprocess, batch: int) -> tuple[float, float]:
    """(CPU ms per photo, photos/s of wall time) of one real DataLoader worker process: dataset,
    collate and the hand-off to this process (its CPU from getrusage once it has exited)."""
    import resource

    from sat_cli.pipeline import load_batches

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    for _ in load_batches(paths, preprocess, batch, workers=1):
        pass
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return 1000 * cpu / len(paths), len(paths) / wall


class ModelClock:
    """CPU seconds the caption loop spends inside the model (the encoder's forward and beam search),
    counted in the run itself with the thread's clock: the rest of the main process is the pipeline's."""

    def __init__(self, model):
        from sat_cli.model import beam

        self.seconds = 0.0
        self._encoder, self._beam = model.encoder.forward, beam.beam_search
        model.encoder.forward = self._timed(self._encoder)
        beam.beam_search = self._timed(self._beam)  # pipeline.decode imports it at each call

    def _timed(self, f):
        def g(*args, **kwargs):
            t = time.thread_time()
            try:
                return f(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - t

        return g


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=384, help="the model's input size (the default model's: 384)")
    ap.add_argument("--worker-photos", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads of the main process (1: a GPU run's main process computes "
                         "nothing itself, and idle OpenMP threads spinning would count as its CPU time)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    from sat_cli.pipeline import decode_settings
    from sat_cli.runtime import keep_freed_memory

    keep_freed_memory()
    images = [im for im in json.loads((DATA / "captions.json").read_text())["images"] if "cocoid" in im]
    paths = [str(DATA / im["filepath"] / im["filename"]) for im in images]
    model = null_model(args.size)
    settings = decode_settings(model.decode_defaults())

    ms, rate = worker_rate(paths[: args.worker_photos], model.preprocess)
    print(f"loader work in this process: {ms:.2f} ms CPU/photo ({1000 / ms:.0f} COCO photos/s of CPU), "
          f"wall {rate:.0f} photos/s (read + hash + decode + resize to {args.size}, {args.worker_photos} photos) "
          f"(load {load()})")
    ms, rate = loader_worker(paths[: args.worker_photos], model.preprocess, args.batch)
    print(f"one loader worker process: {ms:.2f} ms CPU/photo ({1000 / ms:.0f} COCO photos/s of CPU; target >= 400), "
          f"wall {rate:.0f} photos/s (the above plus collate and the hand-off to the main process, and the "
          f"worker's start) (load {load()})")

    runs = {}
    clock = ModelClock(model)
    for n in (args.batch, args.photos // 4, args.photos):  # a first small run pays the imports and warms up
        runs[n] = run(model, paths[:n], settings, args, clock)
    n, (cpu, thread, wall, mod) = args.photos, runs[args.photos]
    q = args.photos // 4
    per = 1000 * (cpu - mod) / n

    def slope(i):  # the slope between two runs: one-off costs (workers' start, imports) cancel
        return 1000 * (runs[n][i] - runs[q][i]) / (n - q)

    steady, steady_loop, model_ms = slope(0) - slope(3), slope(1) - slope(3), slope(3)
    writer = steady - steady_loop
    print(f"null model, {n} photos, {args.workers} workers, batch {args.batch}: main process {per:.2f} ms CPU/image "
          f"besides the model ({steady:.2f} steady: the slope between runs of {q} and {n} photos; target <= 0.2 ms). "
          f"The model's own (encoder forward and the tiny decoder's beam search, timed in the run) {model_ms:.2f} ms "
          f"on top. Of the steady figure: the caption loop {steady_loop:.2f} ms, the other threads (SQLite writer, "
          f"progress bar) {writer:.2f} ms (another core): ceiling {1000 / max(steady_loop, writer):.0f} images/s. "
          f"Wall {n / wall:.0f} images/s (load {load()})")


def run(model, paths: list[str], settings, args, clock: ModelClock) -> tuple[float, float, float, float]:
    """(process CPU, main thread CPU, wall, the model's CPU) seconds of one `caption_to_db` run into
    a new database."""
    from sat_cli.captioning import CaptionOptions, caption_to_db

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for p in paths:
            os.symlink(p, folder / os.path.basename(p))
        options = CaptionOptions(batch_size=args.batch, workers=args.workers, quiet=len(paths) < args.photos)
        clock.seconds = 0.0
        cpu, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
        summary = caption_to_db(model, [str(folder)], str(Path(tmp) / "x.db"), settings, options)
        cpu, thread, wall = time.process_time() - cpu, time.thread_time() - thread, time.perf_counter() - wall
    assert summary.captioned == len(paths), summary
    return cpu, thread, wall, clock.seconds


if __name__ == "__main__":
    main()
