"""Gallery benchmark: does `sat export --format html` stay usable at 10,000 images?
Prints its figures; asserts nothing.

  python bench/gallery_bench.py             # 10,000 images
  python bench/gallery_bench.py --images 2000

Builds a database of N generated photos (each with 3 captions and a 12x12 attention map per word,
plus 1% failed files) through the same store `sat caption` writes with, exports the gallery, and
opens it in headless chromium (Debian's chromium + chromium-driver): time to the first page, to
jump to the last page, to draw a word's overlay, and the number of cards in the page (one page,
not the whole gallery).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

from sat_cli.records import Caption, Result  # noqa: E402
from sat_cli.store.writes import Store, open_db  # noqa: E402

WORDS = "a man woman dog cat sitting standing on the table with red blue small large of in front a street".split()


def build(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    photos = root / "photos"
    photos.mkdir()
    db_path = root / "g.db"
    store = Store(open_db(db_path))
    run_id = store.start_run(model_path="bench", model_fingerprint="f" * 64, encoder="bench", settings="{}",
                             settings_key="k", device="cpu", precision="fp32", batch_size=64)
    batch = []
    for i in range(n):
        path = photos / f"{i:05d}.jpg"
        if i % 100 == 99:
            batch.append(Result(str(path), error="cannot identify image file"))
        else:
            pixels = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((160, 120), Image.BILINEAR).save(path, quality=80)
            data = path.read_bytes()
            captions = []
            for rank in range(3):
                words = list(rng.choice(WORDS, size=int(rng.integers(6, 12))))
                maps = rng.dirichlet(np.ones(144), size=len(words) + 1).reshape(-1, 12, 12).astype(np.float16)
                captions.append(Caption(rank + 1, " ".join(words), words, -5.0 - rank, -0.5 - rank / 10, True,
                                              maps))
            batch.append(Result(str(path), hashlib.sha256(data).hexdigest(), len(data), 160, 120,
                                     captions=captions))
        if len(batch) == 500:
            store.write_batch(run_id, batch, "f" * 64, "k")
            batch = []
    if batch:
        store.write_batch(run_id, batch, "f" * 64, "k")
    store.finish_run(run_id, "done", n - n // 100, 0, n // 100)
    return db_path


def folder_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        db = build(root, args.images)
        print(f"database of {args.images} images (3 captions each, attention maps): {time.perf_counter() - t:.1f}s, "
              f"{db.stat().st_size / 1e6:.0f} MB")
        out = root / "gallery"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sat_cli", "export", str(db), "--format", "html", "--out", str(out),
                        "-q"], check=True)
        print(f"sat export --format html: {time.perf_counter() - t:.1f}s; index.html "
              f"{(out / 'index.html').stat().st_size / 1e3:.1f} kB; {len(list((out / 'data').glob('page-*.js')))} "
              f"page files, largest {max(f.stat().st_size for f in (out / 'data').glob('page-*.js')) / 1e3:.0f} kB; "
              f"folder {folder_size(out) / 1e6:.0f} MB")
        try:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait
            from test_visual import chromium

            browser = chromium()
        except Exception as exc:  # noqa: BLE001 - no browser here: the export figures stand alone
            print(f"browser part skipped: {exc}")
            return
        try:
            wait = WebDriverWait(browser, 60)
            # thumbnails load lazily: those in view (the first card's) must be there
            images_loaded = ("const i = document.querySelector('figure.card img'); "
                             "return !!i && i.complete && i.naturalWidth > 0")
            t = time.perf_counter()
            browser.get((out / "index.html").as_uri())
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "figure.card")) > 0)
            wait.until(lambda b: b.execute_script(images_loaded))
            first = time.perf_counter() - t
            cards = len(browser.find_elements(By.CSS_SELECTOR, "figure.card"))
            info = browser.find_element(By.ID, "page-info").text
            print(f"browser: first page shown with its thumbnails in {first:.2f}s ({cards} cards in the DOM, {info})")
            last = info.split()[-1]
            box = browser.find_element(By.ID, "page-input")
            t = time.perf_counter()
            browser.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'))",
                                   box, last)
            wait.until(lambda b: f"page {last} of {last}" in b.find_element(By.ID, "page-info").text)
            wait.until(lambda b: b.execute_script(images_loaded))
            print(f"browser: jump to page {last}: {time.perf_counter() - t:.2f}s "
                  f"({len(browser.find_elements(By.CSS_SELECTOR, 'figure.card'))} cards)")
            card = browser.find_elements(By.CSS_SELECTOR, "figure.card")[0]
            word = card.find_elements(By.CSS_SELECTOR, ".word")[1]
            t = time.perf_counter()
            word.click()
            canvas = card.find_element(By.CSS_SELECTOR, "canvas.overlay")
            wait.until(lambda b: canvas.is_displayed())
            print(f"browser: click a word, overlay drawn in {time.perf_counter() - t:.2f}s")
            heap = browser.execute_script("return performance.memory ? performance.memory.usedJSHeapSize : null")
            if heap:
                print(f"browser: JS heap after two pages: {heap / 1e6:.1f} MB")
        finally:
            browser.quit()


if __name__ == "__main__":
    main()
