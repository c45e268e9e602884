"""`sat serve`: the real server on 127.0.0.1 called as PhotoPrism, the `ollama` client and sat's
own API call it; the same captions as `sat caption`; --db."""

import json
import shutil
import threading

import httpx
import pytest
from click.testing import CliRunner
from conftest import EXAMPLES
from serving import b64, data_url, photoprism_request, running, tiny_app

from sat_cli.cli import cli
from sat_cli.serve.formats import confidence

PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"]


@pytest.fixture(scope="module")
def server(tiny_model):
    make, cap = tiny_app(tiny_model, max_batch=4, max_wait_ms=20)
    expected = {name: r for name, r in zip(PHOTOS, cap([EXAMPLES / n for n in PHOTOS]))}
    with running(make) as url:
        yield url, expected


def test_photoprism_vision_api(server):
    url, expected = server
    data = (EXAMPLES / "rocket.jpg").read_bytes()
    r = httpx.post(url + "/api/v1/vision/caption", json=photoprism_request([data_url(data, "image/jpeg")]))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    want = expected["rocket.jpg"]
    assert body["id"] == "3f6c0a1e-5b1d-4e6a-9a1e-1c2b3d4e5f60" and body["code"] == 200
    assert body["model"]["name"] == "sat" and isinstance(body["model"]["resolution"], int)
    assert body["model"]["version"] and "error" not in body
    caption = body["result"]["caption"]
    assert caption["text"] == want.text and caption["source"] == "image"
    assert 0 < caption["confidence"] <= 1 and caption["confidence"] == confidence(want.best)


def test_confidence_is_the_geometric_mean_of_word_probabilities():
    import math

    from sat_cli.records import Caption

    cap = Caption(1, "a cat", ["a", "cat"], math.log(0.5) * 3, 0.0, True)  # a, cat, <end>: 0.5 each
    assert confidence(cap) == 0.5
    assert confidence(Caption(1, "a", ["a"], math.log(0.25), 0.0, False)) == 0.25
    assert confidence(None) == 0.0 and confidence(Caption(1, "", [], float("nan"), 0.0, True)) == 0.0


def test_ollama_client(server):
    import ollama

    url, expected = server
    client = ollama.Client(host=url)
    photo = (EXAMPLES / "chelsea.png").read_bytes()
    want = expected["chelsea.png"].text
    out = client.generate(model="sat", prompt="Describe this photo in one sentence.", images=[photo])
    assert out.response == want and out.done and out.model == "sat:latest"
    chunks = list(client.generate(model="sat:latest", prompt="ignored", images=[photo], stream=True))
    assert "".join(c.response for c in chunks) == want
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    as_json = client.generate(model="sat", prompt="JSON please", images=[photo], format="json")
    assert json.loads(as_json.response) == {"caption": want}
    schema = {"type": "object", "properties": {"description": {"type": "string"}}, "required": ["description"]}
    assert json.loads(client.generate(model="sat", prompt="", images=[photo], format=schema).response) == \
        {"description": want}
    chat = client.chat(model="sat", messages=[{"role": "user", "content": "What is in it?", "images": [photo]}])
    assert chat.message.content == want and chat.message.role == "assistant" and chat.done
    streamed = client.chat(model="sat", messages=[{"role": "user", "content": "", "images": [photo]}], stream=True)
    assert "".join(c.message.content for c in streamed) == want
    assert [m.model for m in client.list().models] == ["sat:latest"]
    shown = client.show("sat")
    assert "vision" in shown.capabilities and shown.details.family == "sat"
    assert httpx.get(url + "/api/version").json()["version"]
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="llava", prompt="x", images=[photo])
    assert err.value.status_code == 404 and "llava" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.show("llava:7b")
    assert err.value.status_code == 404


def test_ollama_request_as_photoprism_sends_it(server):
    """PhotoPrism's Ollama engine: base64 images (no data: prefix), stream false; it reads ``response``."""
    url, expected = server
    request = photoprism_request([b64((EXAMPLES / "coffee.png").read_bytes())])
    r = httpx.post(url + "/api/generate", json=request)
    assert r.status_code == 200 and r.json()["response"] == expected["coffee.png"].text and r.json()["done"]


def test_sat_api_multipart_and_json(server):
    url, expected = server
    files = [("image", (n, (EXAMPLES / n).read_bytes())) for n in ("chelsea.png", "rocket.jpg")]
    r = httpx.post(url + "/v1/caption", files=files, data={"attention": "true"})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["name"] for x in results] == ["chelsea.png", "rocket.jpg"]
    for x in results:
        want = expected[x["name"]]
        assert x["caption"] == want.text and x["score"] == pytest.approx(want.score, abs=1e-5)
        assert [c["text"] for c in x["nbest"]] == [c.text for c in want.nbest]
        maps = x["nbest"][0]["attention"]
        assert len(maps) == len(want.words) and (len(maps[0]), len(maps[0][0])) == want.attention.shape[1:]
        assert "attention" not in x["nbest"][-1] or len(x["nbest"]) == 1
        assert x["sha256"] == want.sha256 and (x["width"], x["height"]) == (want.width, want.height)
    r = httpx.post(url + "/v1/caption", json={"images": [b64((EXAMPLES / "coffee.png").read_bytes())]})
    assert r.status_code == 200 and r.json()["results"][0]["caption"] == expected["coffee.png"].text
    assert "attention" not in r.json()["results"][0]["nbest"][0]


def test_same_captions_as_sat_caption_with_requests_batched_together(server, tiny_model, tmp_path):
    url, _ = server
    folder = tmp_path / "photos"
    folder.mkdir()
    for n in PHOTOS:
        shutil.copy(EXAMPLES / n, folder / n)
    res = CliRunner().invoke(cli, ["caption", str(folder), "--db", str(tmp_path / "c.db"), "--model", str(tiny_model),
                                   "--device", "cpu", "--workers", "0", "-q"], catch_exceptions=False)
    assert res.exit_code == 0
    from sat_cli.store.queries import best_captions
    from sat_cli.store.writes import open_db

    stored = {k.rsplit("/", 1)[-1]: v for k, v in best_captions(open_db(tmp_path / "c.db")).items()}
    got, barrier = {}, threading.Barrier(len(PHOTOS))

    def ask(name):
        barrier.wait()  # all at once: the batcher takes them together
        r = httpx.post(url + "/v1/caption", files=[("image", (name, (folder / name).read_bytes()))], timeout=60)
        got[name] = r.json()["results"][0]["caption"]

    threads = [threading.Thread(target=ask, args=(n,)) for n in PHOTOS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == stored


def test_db_stores_each_photo_once(tiny_model, tmp_path, monkeypatch):
    import sat_cli.pipeline as pipeline

    calls, real = [], pipeline.caption_rows

    def counting(model, results, *args, **kwargs):
        calls.append(len(results))
        return real(model, results, *args, **kwargs)

    monkeypatch.setattr(pipeline, "caption_rows", counting)  # the batcher looks it up at each batch
    db = tmp_path / "served.db"
    make, _ = tiny_app(tiny_model, db=str(db))
    photo = (EXAMPLES / "chelsea.png").read_bytes()
    with running(make) as url:
        first = httpx.post(url + "/v1/caption", files=[("image", ("a.png", photo))]).json()["results"][0]
        again = httpx.post(url + "/api/v1/vision/caption", json=photoprism_request([data_url(photo)])).json()
        both = httpx.post(url + "/v1/caption", json={"images": [b64(photo), b64(photo)]}).json()["results"]
    assert calls == [1]  # captioned once, then read back from the store
    assert again["result"]["caption"]["text"] == first["caption"] == both[0]["caption"] == both[1]["caption"]
    from sat_cli.store.writes import open_db

    conn = open_db(db)
    assert conn.execute("SELECT count(*) FROM results").fetchone()[0] == 1
    assert conn.execute("SELECT path FROM images").fetchall() == [("serve:" + first["sha256"],)]
    assert conn.execute("SELECT status FROM runs").fetchall() == [("done",)]
    out = CliRunner().invoke(cli, ["export", str(db), "--format", "csv"], catch_exceptions=False)
    assert first["caption"] in out.output


def test_non_loopback_host_needs_a_token():
    res = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "--token" in res.output and "--no-auth" in res.output


def test_port_in_use_is_a_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        res = CliRunner().invoke(cli, ["serve", "--port", str(s.getsockname()[1])])
    assert res.exit_code == 1 and "cannot listen on 127.0.0.1" in res.output and "Traceback" not in res.output


def test_batcher_takes_queued_requests_together_up_to_max_batch(tiny_model):
    """Requests queued while the model is busy go through it together, at most --max-batch images
    at a time, each getting its own captions back."""
    import sat_cli
    from sat_cli.inputs.images import Sources
    from sat_cli.serve.batching import Batcher

    cap = sat_cli.load(str(tiny_model), device="cpu")
    expected = cap([EXAMPLES / n for n in PHOTOS])
    sources = Sources(cap.model.preprocess.size, cap.model.preprocess.interpolation)
    for max_batch, batches, sizes, closed in ((16, 1, {5: 1}, {"waited": 1}),
                                              (2, 3, {2: 2, 1: 1}, {"full": 2, "waited": 1})):
        batcher = Batcher(cap.model, cap.settings(), max_batch=max_batch, max_wait_ms=0)
        jobs = [batcher.submit([sources.from_bytes(None, (EXAMPLES / n).read_bytes())], False) for n in PHOTOS]
        jobs.append(batcher.submit([sources.from_bytes(None, (EXAMPLES / PHOTOS[0]).read_bytes())], False))
        batcher.start()  # everything is queued before the model thread looks
        got = [job.result(60)[0] for job in jobs]
        batcher.close()
        assert [r.text for r in got] == [r.text for r in expected] + [expected[0].text]
        assert (batcher.batches, batcher.images) == (batches, len(PHOTOS) + 1)
        stats = batcher.stats.as_dict()  # how /healthz and bench/serve_bench.py see the batches form
        assert stats["sizes"] == {str(k): v for k, v in sizes.items()} and stats["closed"] == closed
        assert stats["seconds"]["model"] > 0 and stats["seconds"]["queued"] > 0


def test_healthz_shows_requests_and_how_batches_formed(server):
    url, _ = server
    before = httpx.get(url + "/healthz").json()
    photos = [("image", (n, (EXAMPLES / n).read_bytes())) for n in PHOTOS[:2]]
    assert httpx.post(url + "/v1/caption", files=photos, timeout=60).status_code == 200
    after = httpx.get(url + "/healthz").json()  # /healthz itself is not counted
    assert after["requests"] == before["requests"] + 1 and after["in_flight"] == 0 and after["refused_busy"] == 0
    b0, b1 = before["batching"], after["batching"]
    assert b1["images_decoded"] == b0["images_decoded"] + 2
    taken = sum(int(k) * v for k, v in b1["sizes"].items()) - sum(int(k) * v for k, v in b0["sizes"].items())
    assert taken == 2 and sum(b1["closed"].values()) > sum(b0["closed"].values())
    assert all(b1["seconds"][k] > b0["seconds"][k] for k in ("decode", "model"))
    assert after["request_seconds"] > before["request_seconds"]


def counting_batcher(tiny_model, monkeypatch, first_call_s: float = 0.0, **options):
    """A started Batcher on the tiny model whose model calls are counted (images per call), the
    first one made ``first_call_s`` longer; with the decoded example photos to submit."""
    import time

    import sat_cli
    import sat_cli.pipeline as pipeline
    from sat_cli.inputs.images import Sources
    from sat_cli.serve.batching import Batcher

    real, calls = pipeline.caption_rows, []

    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 1:
            time.sleep(first_call_s)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "caption_rows", counted)
    cap = sat_cli.load(str(tiny_model), device="cpu")
    sources = Sources(cap.model.preprocess.size, cap.model.preprocess.interpolation)
    photos = [sources.from_bytes(None, (EXAMPLES / n).read_bytes()) for n in [*PHOTOS, "camera.png"]]
    batcher = Batcher(cap.model, cap.settings(), **options)
    batcher.start()
    return batcher, photos, calls


def test_a_batch_waits_the_grace_for_images_still_being_decoded(tiny_model, monkeypatch):
    """--max-wait-ms is up but another request's image is still being decoded: the batch waits
    for it (up to the grace, 4x --max-wait-ms), on a fresh server as after any model call."""
    import time

    batcher, photo, calls = counting_batcher(tiny_model, monkeypatch, max_batch=16, max_wait_ms=50)
    try:
        for first, second in ((0, 1), (2, 3)):
            with batcher.arriving(1):  # B is being decoded while A queues
                a = batcher.submit([photo[first]], False)
                time.sleep(0.1)  # past A's 50 ms, well within the 200 ms grace
                b = batcher.submit([photo[second]], False)
            a.result(60), b.result(60)
    finally:
        batcher.close()
    assert calls == [2, 2] and batcher.stats.closed == {"waited": 2}


def test_images_queued_behind_a_busy_model_wait_for_the_callers_just_answered(tiny_model, monkeypatch):
    """Closed-loop clients: B queued while A's batch ran; A's caller sends again (C) just after
    its answer. B waits a tenth of its queue time for C, so they share one batch, instead of the
    two taking turns in half-batches for ever (what 16 bench clients did: batches of 15 and 1)."""
    import time

    batcher, photo, calls = counting_batcher(tiny_model, monkeypatch, 3.0, max_batch=16, max_wait_ms=5)
    try:
        a = batcher.submit([photo[0]], False)
        time.sleep(0.5)  # A is in the model
        b = batcher.submit([photo[1]], False)
        a.result(60)
        time.sleep(0.03)  # A's caller sends its next photo
        c = batcher.submit([photo[2]], False)
        b.result(60), c.result(60)
    finally:
        batcher.close()
    assert calls == [1, 2] and batcher.stats.sizes == {1: 1, 2: 1}


def test_the_batch_after_a_model_call_waits_for_the_callers_it_answered(tiny_model, monkeypatch):
    """Closed-loop clients in two groups: A's two images are in the model, B queues just before
    the call ends. B's batch then waits (up to a quarter of the last call) until A's two callers
    are back, so the three share one call, instead of B going alone and the groups taking turns."""
    import time

    batcher, photo, calls = counting_batcher(tiny_model, monkeypatch, 1.2, max_batch=16, max_wait_ms=5)
    try:
        a = [batcher.submit([photo[0]], False), batcher.submit([photo[1]], False)]
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(1.1)  # near the end of A's call: B has queued 0.1 s, so its own catch-up is 10 ms
        b = batcher.submit([photo[2]], False)
        a[0].result(60), a[1].result(60)
        time.sleep(0.06)  # A's callers send their next photos, one after the other
        c = batcher.submit([photo[3]], False)
        time.sleep(0.04)
        d = batcher.submit([photo[4]], False)
        b.result(60), c.result(60), d.result(60)
    finally:
        batcher.close()
    assert calls == [2, 3] and batcher.stats.sizes == {2: 1, 3: 1}


def test_connections_to_the_listening_socket_get_tcp_nodelay():
    """The socket `sat serve` listens on says it is TCP, so asyncio (as uvicorn runs it) sets
    TCP_NODELAY on every connection: without it each answer on a kept-alive connection (PhotoPrism's
    Go client, httpx) waited ~40 ms for the client's delayed ACK (GET /healthz: 44 ms, now 0.3)."""
    import asyncio
    import socket

    from sat_cli.cli.serve import _bind

    sock = _bind("127.0.0.1", 0)
    seen = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport):
            seen.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def main():
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()

    asyncio.run(main())
    assert seen and seen[0] != 0
