"""`sat serve --db`: served photos go into the same SQLite store as `sat caption` writes, keyed
by content (sha256), model and decode settings, so a photo served twice is captioned once and
`sat export`, `sat search` and `sat metadata` read them. Used from the model thread only (an
SQLite connection stays in the thread that opened it)."""

from __future__ import annotations

import json

from ..records import Caption, Result

PATH_PREFIX = "serve:"  # images.path of a served photo: serve:<sha256> (it has no file name)


class ServeStore:
    def __init__(self, db_path: str, model, settings):
        from ..store.writes import Store, open_db

        self.model, self.key = model, settings.key()
        self.store = Store(open_db(db_path))
        self.db = self.store.db
        self.captioned = self.failed = 0
        self.run_id = self.store.start_run(
            model_path=model.path, model_fingerprint=model.fingerprint, encoder=model.encoder_spec,
            settings=json.dumps(settings.to_dict()), settings_key=self.key, device=str(model.device),
            precision=model.precision, batch_size=0,
        )

    def lookup(self, hashes: set[str]) -> dict[str, list[Caption]]:
        """The stored n-best lists (with attention maps when stored) of the content in ``hashes``."""
        from ..store.queries import decode_attention

        found: dict[str, list[Caption]] = {}
        for sha in hashes:
            rows = self.db.execute(
                """SELECT c.id, c.rank, c.text, c.tokens, c.logprob, c.score, c.finished, a.words, a.grid_h,
                          a.grid_w, a.data
                   FROM results r JOIN captions c ON c.result_id = r.id
                   LEFT JOIN attention_maps a ON a.caption_id = c.id
                   WHERE r.sha256 = ? AND r.model_fingerprint = ? AND r.settings_key = ? ORDER BY c.rank""",
                [sha, self.model.fingerprint, self.key]).fetchall()
            if rows:
                found[sha] = [
                    Caption(rank, text, json.loads(tokens), logprob, score, bool(finished),
                            decode_attention({"words": w, "grid_h": gh, "grid_w": gw, "data": data})
                            if data is not None else None)
                    for _, rank, text, tokens, logprob, score, finished, w, gh, gw, data in rows
                ]
        return found

    def save(self, results: list[Result]) -> None:
        """Store freshly captioned (or failed) photos in one transaction."""
        rows = [Result(PATH_PREFIX + r.sha256, sha256=r.sha256, size=r.size, width=r.width, height=r.height,
                       error=r.error, captions=r.captions) for r in results]
        self.store.write_batch(self.run_id, rows, self.model.fingerprint, self.key)
        self.captioned += sum(1 for r in rows if r.captions)
        self.failed += sum(1 for r in rows if r.error)

    def close(self) -> None:
        try:
            self.store.finish_run(self.run_id, "done_with_errors" if self.failed else "done", self.captioned, 0,
                                  self.failed)
        finally:
            self.db.close()
