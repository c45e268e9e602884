"""The three answer formats: PhotoPrism's Vision API (``ApiResponse`` in PhotoPrism's
internal/ai/vision/api_response.go), the Ollama API (generate, tags, show, version) and sat's own;
and each one's error shape, so a caller always gets an error it can parse."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

from ..records import Caption, Result

MODEL_NAME = "sat"  # what Ollama clients call the loaded model: "sat" or "sat:latest"
OLLAMA_NAMES = frozenset({"sat", "sat:latest"})


def confidence(caption: Caption | None) -> float:
    """The best caption's confidence in 0..1: exp(logprob / tokens), the geometric mean of the
    probabilities the model gave each word it chose (and ``<end>`` when the caption finished)."""
    if caption is None:
        return 0.0
    tokens = len(caption.words) + (1 if caption.finished else 0)
    if tokens == 0 or not math.isfinite(caption.logprob):
        return 0.0
    return round(min(1.0, max(0.0, math.exp(caption.logprob / tokens))), 4)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# -- PhotoPrism Vision API ---------------------------------------------------------------------

def photoprism_caption(request_id: str, info: dict, result: Result) -> dict:
    """ApiResponse: id, code, model {type, name, version, resolution}, result.caption {text,
    source, confidence}, as PhotoPrism's NewCaptionResponse builds it."""
    return {
        "id": request_id,
        "code": 200,
        "model": {"type": "caption", "name": MODEL_NAME, "version": info["version"], "resolution": info["resolution"]},
        "result": {"caption": {"text": result.text, "source": "image", "confidence": confidence(result.best)}},
    }


def photoprism_error(message: str, status: int, request_id: str = "") -> dict:
    """ApiResponse of a failed request (PhotoPrism's NewApiError, with the reason in ``error``)."""
    out = {"code": status, "error": message, "result": {}}
    if request_id:
        out = {"id": request_id, **out}
    return out


# -- Ollama --------------------------------------------------------------------------------------

def ollama_error(message: str, status: int) -> dict:
    return {"error": message}


def ollama_text(results: list[Result], fmt) -> str:
    """The ``response`` text: the caption (one line per image), or with ``format`` "json" or a
    JSON schema, a JSON object holding it: {"caption": ...} (the schema's first string property
    when it names one; several images: a list under that key)."""
    texts = [r.text for r in results]
    if not fmt:
        return "\n".join(texts)
    key = "caption"
    if isinstance(fmt, dict):
        props = fmt.get("properties") or {}
        strings = [k for k, v in props.items() if isinstance(v, dict) and v.get("type") == "string"]
        required = [k for k in fmt.get("required") or [] if k in strings]
        key = (required or strings or [key])[0]
    return json.dumps({key: texts[0] if len(texts) == 1 else "\n".join(texts)})


def ollama_generate(text: str, results: list[Result], seconds: float, done_reason: str = "stop") -> dict:
    """The final (or only) object of /api/generate."""
    tokens = sum(len(r.words) for r in results)
    ns = int(seconds * 1e9)
    return {"model": "sat:latest", "created_at": now_iso(), "response": text, "done": True, "done_reason": done_reason,
            "context": [], "total_duration": ns, "load_duration": 0, "prompt_eval_count": 0,
            "prompt_eval_duration": 0, "eval_count": tokens, "eval_duration": ns}


def ollama_chunks(text: str, results: list[Result], seconds: float):
    """Streamed /api/generate: one object per word (``done`` false), then the final one."""
    words = text.split(" ")
    for i, word in enumerate(words):
        yield {"model": "sat:latest", "created_at": now_iso(), "response": word + (" " if i < len(words) - 1 else ""),
               "done": False}
    yield ollama_generate("", results, seconds)


def as_chat(chunk: dict) -> dict:
    """A /api/generate object as /api/chat gives it: the text in ``message.content``."""
    out = {k: v for k, v in chunk.items() if k not in ("response", "context")}
    out["message"] = {"role": "assistant", "content": chunk["response"]}
    return out


def ollama_details(info: dict) -> dict:
    return {"parent_model": "", "format": "safetensors", "family": "sat", "families": ["sat"],
            "parameter_size": info["parameter_size"], "quantization_level": info["quantization"]}


def ollama_tags(info: dict) -> dict:
    return {"models": [{"name": "sat:latest", "model": "sat:latest", "modified_at": info["modified_at"],
                        "size": info["size"], "digest": info["fingerprint"], "details": ollama_details(info)}]}


def ollama_show(info: dict) -> dict:
    return {"modelfile": f"# sat Show, Attend and Tell captioner\nFROM {info['path']}\n", "parameters": "",
            "template": "{{ .Prompt }}", "details": ollama_details(info),
            "model_info": {"general.architecture": "show-attend-tell", "general.basename": "sat",
                           "sat.encoder": info["encoder"], "sat.fingerprint": info["fingerprint"],
                           "sat.image_size": info["resolution"]},
            "capabilities": ["completion", "vision"], "modified_at": info["modified_at"]}


# -- sat's own API -------------------------------------------------------------------------------

def sat_caption(caption: Caption, attention: bool) -> dict:
    out = {"rank": caption.rank, "text": caption.text, "words": caption.words, "logprob": caption.logprob,
           "score": caption.score, "finished": caption.finished}
    if attention and caption.attention is not None:
        out["attention"] = caption.attention.astype("float32").round(4).tolist()  # (words, grid_h, grid_w)
    return out


def sat_result(name: str, result: Result, attention: bool) -> dict:
    return {"name": name, "sha256": result.sha256, "bytes": result.size, "width": result.width,
            "height": result.height, "caption": result.text, "score": result.score,
            "confidence": confidence(result.best),
            "nbest": [sat_caption(c, attention and c.rank == 1) for c in result.captions]}


def sat_error(message: str, status: int) -> dict:
    return {"error": {"status": status, "message": message}}


ERRORS = {"photoprism": photoprism_error, "ollama": ollama_error, "sat": sat_error}


def caller_format(path: str) -> str:
    """Which API a path belongs to, so its errors come in that API's shape."""
    if path.startswith("/api/v1/vision"):
        return "photoprism"
    if path.startswith("/api/"):
        return "ollama"
    return "sat"
