"""A notebook-style tour of sat's Python API, run as a script (CI runs it too):

    python examples/api_tour.py

It captions the bundled example photos with the shipped model, as files, as a PIL image and as a
numpy array, looks at the n-best list and an attention map, streams a folder lazily and writes
a database exactly as `sat caption` would.
"""

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import sat_cli

HERE = Path(__file__).resolve().parent

# 1. Load a model: the default is the one shipped with sat; device="auto" picks CUDA, MPS or the CPU.
cap = sat_cli.load(device="auto")
print(cap)

# 2. Caption a mix of inputs: file paths, a PIL image and a uint8 (H, W, 3) array.
photo = Image.open(HERE / "chelsea.png")
pixels = np.asarray(Image.open(HERE / "coffee.png").convert("RGB"))
out = cap([HERE / "rocket.jpg", photo, pixels], beam=3, n_best=3)
for result in out:
    print(f"{result.path or 'in-memory image'}: {result.text!r} (score {result.score:.2f})")

# 3. The n-best list and the attention: one map per word of the best caption.
best = out[1]
print("runner-up:", best.nbest[1].text)
print("attention maps (words, grid height, grid width):", best.attention.shape)
word, alpha = best.words[0], best.attention[0]
row, col = np.unravel_index(np.argmax(alpha), alpha.shape)
print(f"the first word, {word!r}, looks hardest at cell ({row}, {col}) with weight {alpha.max():.3f}")

# 4. Bad inputs are values, not exceptions: the other images of the batch are still captioned.
mixed = cap([HERE / "camera.png", HERE / "no-such-photo.jpg"])
print([(r.path.rsplit("/", 1)[-1], r.error or r.text) for r in mixed])

# 5. Stream a folder lazily (for a million files), a batch at a time.
for result in cap.stream(HERE, batch_size=2):
    print("stream:", Path(result.path).name, "->", result.text)

# 6. What `sat caption` does: captions, n-best lists and maps into SQLite; a rerun skips what is stored.
with tempfile.TemporaryDirectory() as tmp:
    db = Path(tmp) / "examples.db"
    summary = cap.to_db(db, [HERE])
    print(f"to_db: {summary.captioned} captioned, {summary.failed} failed (run {summary.run_id})")
    again = cap.to_db(db, [HERE])
    print(f"rerun: {again.skipped} skipped, {again.captioned} captioned")
