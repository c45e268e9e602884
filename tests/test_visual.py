"""sat show, sat search, the HTML gallery (in a real headless Chromium) and Datasette."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import sqlite_utils
from click.testing import CliRunner
from PIL import Image

from conftest import EXAMPLES, build_tiny_model
from sat_cli.cli.main import cli

INJECTED = '<img src=x onerror="document.title=1">&amp;.png'


@pytest.fixture(scope="module")
def gallery_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("gal")
    model = build_tiny_model(root / "model", words=["a", "cat", "dog", "cup", "rocket", "on", "table", "sky"],
                             decode={"max_len": 6}, end_bias=-3.0)
    photos = root / "photos"
    photos.mkdir()
    for name in ("chelsea.png", "coffee.png", "rocket.jpg"):
        shutil.copy(EXAMPLES / name, photos / name)
    shutil.copy(EXAMPLES / "astronaut.png", photos / INJECTED)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    db = root / "g.db"
    r = CliRunner().invoke(cli, ["caption", str(photos), "--db", str(db), "--model", str(model), "--workers", "0",
                                 "-q", "--beam", "3"])
    assert r.exit_code == 1  # broken.jpg
    return db, photos


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ------------------------------------------------------------------ sat show
def test_show_writes_the_attention_figure(gallery_db, tmp_path):
    db, photos = gallery_db
    out = tmp_path / "cat.png"
    r = run("show", db, photos / "chelsea.png", "--out", out)
    assert r.exit_code == 0, r.output
    fig = Image.open(out)
    caption = sqlite_utils.Database(db).execute(
        "select text, tokens from captions join results on results.id = captions.result_id "
        "join images using (sha256) where images.path like '%chelsea.png' and rank = 1").fetchone()
    words = json.loads(caption[1])
    assert fig.format == "PNG" and len(words) >= 2
    columns = min(5, len(words) + 1)
    assert fig.width >= 200 * columns  # a panel per word plus the image
    assert caption[0] in r.stderr


def test_each_word_panel_lights_where_its_own_map_points(tmp_path):
    """On a white photo, word 1 attends only the top-left cell and word 2 only the bottom-right:
    each panel is bright where its own map points and dim elsewhere, and prints the real peak
    weight and entropy (a uniform third word shows entropy 1.00, not a sharp map)."""
    from sat_cli.views.show import render

    photo = tmp_path / "white.png"
    Image.new("RGB", (200, 200), "white").save(photo)
    maps = np.zeros((3, 4, 4), dtype=np.float32)
    maps[0, 0, 0] = maps[1, 3, 3] = 1.0
    maps[2] = 1 / 16
    out = render(str(photo), ["left", "right", "all"], maps, "left right all", tmp_path / "f.png", columns=4, panel=200)
    arr = np.asarray(Image.open(out).convert("L"), dtype=np.float32)
    dark = arr < 100  # the dimmed parts of the panels (the photo itself is white)
    ys = np.flatnonzero(dark.sum(axis=1) > 150)  # rows through the panels (text rows have fewer dark pixels)
    top, bottom = ys.min(), ys.max()
    row = np.flatnonzero(dark[(top + bottom) // 2])  # the middle row crosses panels 1 and 2 in the dark
    starts = row[np.r_[True, np.diff(row) > 1]]
    left, step = starts[0], starts[1] - starts[0]  # panel 1's left edge, panel to panel
    right = left + (bottom - top)  # square panels

    def brightness(panel, cy, cx):  # mean of a window at (cy, cx), fractions of panel `panel`'s size
        x0 = left + (panel - 1) * step + cx * (right - left)
        y0 = top + cy * (bottom - top)
        return float(arr[int(y0) - 5 : int(y0) + 5, int(x0) - 5 : int(x0) + 5].mean())

    assert brightness(1, 0.1, 0.1) > 200 and brightness(1, 0.9, 0.9) < 80
    assert brightness(2, 0.9, 0.9) > 200 and brightness(2, 0.1, 0.1) < 80
    assert brightness(3, 0.1, 0.1) > 200 and brightness(3, 0.9, 0.9) > 200  # uniform: evenly lit, not a spot


def test_show_selects_by_hash_prefix_row_id_and_rank(gallery_db, tmp_path, monkeypatch):
    db, photos = gallery_db
    sdb = sqlite_utils.Database(db)
    row = next(sdb["images"].rows_where("path like '%coffee.png'"))
    texts = dict(sdb.execute("SELECT captions.rank, captions.text FROM captions JOIN results ON results.id = "
                             "captions.result_id WHERE results.sha256 = ?", [row["sha256"]]).fetchall())
    assert len(set(texts.values())) == 3  # distinct captions per rank, so the one drawn is identifiable
    for i, (selector, rank) in enumerate(((row["sha256"][:8], 1), (str(row["id"]), 2), ("photos/coffee.png", 3))):
        monkeypatch.chdir(tmp_path / str(i) if (tmp_path / str(i)).mkdir() is None else None)
        r = run("show", db, selector, "--rank", rank)  # no --out: the figure is named after the image drawn
        assert r.exit_code == 0 and [p.name for p in Path.cwd().iterdir()] == ["coffee.attention.png"], r.output
        assert f"{texts[rank]!r}" in r.output, (selector, rank, r.output)  # this image's caption of this rank
        assert all(f"{texts[other]!r}" not in r.output for other in texts if other != rank)
    r = run("show", db, str(row["id"]), "--rank", "9", "--out", tmp_path / "d.png")
    assert r.exit_code == 2 and "No caption of rank 9" in r.stderr and "ranks stored: [1, 2, 3]" in r.stderr


def test_show_errors_are_clear(gallery_db, tmp_path):
    db, photos = gallery_db
    r = run("show", db, "nothing-like-this.jpg")
    assert r.exit_code == 2 and "No image matches" in r.stderr
    for folder, src in (("a", "chelsea.png"), ("b", "coffee.png")):
        (tmp_path / folder).mkdir()
        shutil.copy(EXAMPLES / src, tmp_path / folder / "x.png")
    model = build_tiny_model(tmp_path / "m")
    two = tmp_path / "two.db"
    run("caption", tmp_path / "a", tmp_path / "b", "--db", two, "--model", model, "--workers", "0", "-q")
    r = run("show", two, "x.png")  # the same name in two folders
    assert r.exit_code == 2 and "matches 2 images" in r.stderr and "pick one" in r.stderr
    assert run("show", two, "a/x.png", "--out", tmp_path / "ok.png").exit_code == 0
    r = run("show", db, "broken.jpg")
    assert r.exit_code == 2 and "was not captioned" in r.stderr


# ------------------------------------------------------------------ sat search
def test_search_ranks_matches_and_filters(gallery_db):
    db, _ = gallery_db
    texts = [r[0] for r in sqlite_utils.Database(db).execute("select text from captions")]
    word = max({w for t in texts for w in t.split()}, key=lambda w: sum(w in t.split() for t in texts))
    r = run("search", db, word, "--json", "--limit", "50")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert rows and all(word in row["caption"].split() for row in rows)
    assert len(rows) == sum(word in t.split() for t in texts)
    assert [row["relevance"] for row in rows] == sorted(row["relevance"] for row in rows)
    best_only = json.loads(run("search", db, word, "--json", "--rank", "1").stdout)
    assert best_only and all(row["rank"] == 1 for row in best_only)
    csv_out = run("search", db, word, "--csv").stdout.splitlines()
    assert csv_out[0].startswith("path,rank,caption")
    none = json.loads(run("search", db, "zebra", "--json").stdout)
    assert none == []


def test_search_bad_query_gives_a_hint(gallery_db):
    db, _ = gallery_db
    r = run("search", db, 'cat AND ("dog')
    assert r.exit_code == 2 and "Bad search query" in r.stderr and "exact phrase" in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------ datasette
def test_database_opens_in_datasette_with_full_text_search(gallery_db):
    import asyncio

    from datasette.app import Datasette

    db, _ = gallery_db
    texts = [r[0] for r in sqlite_utils.Database(db).execute("select text from captions")]
    word = texts[0].split()[0]

    async def check():
        ds = Datasette([str(db)])
        name = Path(db).stem
        tables = (await ds.client.get(f"/{name}.json")).json()["tables"]
        captions = next(t for t in tables if t["name"] == "captions")
        assert captions["fts_table"] == "captions_fts"
        found = (await ds.client.get(f"/{name}/captions.json?_search={word}&_shape=array")).json()
        assert found and all(word in row["text"].split() for row in found)

    asyncio.run(check())


# ------------------------------------------------------------------ gallery
def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--allow-file-access-from-files", "--window-size=1400,1000"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_html_gallery_in_a_real_browser(gallery_db, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    db, photos = gallery_db
    out = tmp_path / "gallery"
    r = run("export", db, "--format", "html", "--out", out, "--page-size", "3", "-q")
    assert r.exit_code == 0, r.output
    assert (out / "index.html").exists() and len(list((out / "data").glob("page-*.js"))) == 2
    assert len(list((out / "thumbs").rglob("*.jpg"))) == 4
    assert "<img src=x" not in (out / "data" / "page-00001.js").read_text()  # escaped in the data too

    sdb = sqlite_utils.Database(db)
    stored = {row["path"]: row["text"] for row in sdb.query(
        "select images.path, captions.text from images join results using (sha256) "
        "join captions on captions.result_id = results.id and captions.rank = 1")}
    browser = chromium()
    try:
        browser.get((out / "index.html").as_uri())
        wait = WebDriverWait(browser, 20)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "figure.card")) == 3)
        wait.until(lambda b: b.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"))
        assert "5 images" in browser.find_element(By.ID, "stats").text

        def cards():
            return {c.find_element(By.CSS_SELECTOR, ".path").text: c
                    for c in browser.find_elements(By.CSS_SELECTOR, "figure.card")}

        page1 = cards()
        # the injected file name is text, not markup, and its onerror handler never ran
        injected = str(photos / INJECTED)
        assert injected in page1
        assert browser.title == "sat gallery"
        assert browser.execute_script("return document.querySelectorAll('main img[src=x]').length") == 0
        # click a word: its overlay appears over the thumbnail, with pixels drawn
        card = page1[injected]
        canvas = card.find_element(By.CSS_SELECTOR, "canvas.overlay")
        assert not canvas.is_displayed()
        word = card.find_elements(By.CSS_SELECTOR, ".word")[1]
        word.click()
        assert canvas.is_displayed() and canvas.get_attribute("data-word") == "1"
        assert "active" in word.get_attribute("class")
        alpha = browser.execute_script(
            "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let lo = 255, hi = 0; for (let i = 3; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }"
            "return [c.width, lo, hi];", canvas)
        assert alpha[0] > 50 and alpha[2] > alpha[1]  # a map, not a flat wash
        # beside it, the map's real peak weight and entropy (the overlay is scaled to its own peak)
        stats = card.find_element(By.CSS_SELECTOR, ".mapstats")
        assert stats.is_displayed()
        db_map = sqlite_utils.Database(db).execute(
            "SELECT words, grid_h, grid_w, data FROM attention_maps JOIN captions ON captions.id = caption_id "
            "JOIN results ON results.id = result_id JOIN images USING (sha256) WHERE images.path = ? AND rank = 1",
            [injected]).fetchone()
        from sat_cli.evaluation.pointing import map_stats
        from sat_cli.store.queries import decode_attention

        maps = decode_attention(dict(zip(("words", "grid_h", "grid_w", "data"), db_map)))
        peak, entropy = map_stats(maps[1])
        assert stats.text == f"{word.text}: peak {peak:.3f}, entropy {entropy:.2f} of uniform"
        # page 2 loads on demand
        browser.find_element(By.ID, "next").click()
        wait.until(lambda b: "page 2 of 2" in b.find_element(By.ID, "page-info").text)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "figure.card")) == 2)
        wait.until(lambda b: b.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"))
        page2 = cards()
        assert not set(page1) & set(page2) and len(set(page1) | set(page2)) == 5
        # every captioned image shows its best caption first; the failed file shows its error
        browser.find_element(By.ID, "prev").click()
        wait.until(lambda b: "page 1 of 2" in b.find_element(By.ID, "page-info").text)
        for page in (1, 2):
            if page == 2:
                browser.find_element(By.ID, "next").click()
                wait.until(lambda b: "page 2 of 2" in b.find_element(By.ID, "page-info").text)
            for path, card in cards().items():
                if path.endswith("broken.jpg"):
                    assert "failed" in card.get_attribute("class") and "not an image" in card.text
                else:
                    assert card.find_element(By.CSS_SELECTOR, "ol.captions li").text.startswith(stored[path])
        browser.find_element(By.ID, "show-failures").click()
        wait.until(lambda b: "Failed files (1)" in b.find_element(By.ID, "failures").text)
        assert browser.title == "sat gallery"
    finally:
        browser.quit()
