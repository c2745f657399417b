"""The HTTP app: the page, the OpenAI- and AUTOMATIC1111-shaped image routes, `/v1/models` and `/health`.

    GET  /                         the page (static HTML/JS/CSS from the package; nothing from the network)
    GET  /health                   {"status": "ok", ...}; open even with an API key
    GET  /v1/models                the loaded models (id, runtime, resolution, ControlNet, style)
    POST /v1/images/generations    OpenAI images shape: prompt, n, size, response_format b64_json, + seed,
                                   model, control_image
    POST /sdapi/v1/txt2img         AUTOMATIC1111 shape: prompt, seed, width, height, batch_size, steps,
                                   override_settings.sd_model_checkpoint, + control_image

Every error is JSON `{"error": {"message", "type", "code"}}` with a 4xx code for a bad request, 503 with
Retry-After when the model's queue is full or the request timed out waiting.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import secrets
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdxs_edge.errors import SDXSError
from server.models import Entry
from server.worker import QueueFullError, Worker

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
MAX_SEED = 2**32 - 1
MAX_CONTROL_SIDE = 4096  # pixels: a larger control image is refused before it is decoded


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.

    Args:
        max_prompt_chars: longest prompt (CLIP reads 77 tokens; longer text is truncated by the tokenizer).
        max_n: most images per request (`n`, `batch_size`).
        max_body_bytes: largest request body (a base64 control image included).
        max_queue: requests that may wait per model; one more gets 503 with Retry-After.
        timeout_s: seconds a request may wait and run before it gets 503.
        retry_after_s: the Retry-After value sent with a 503.
    """

    max_prompt_chars: int = 2000
    max_n: int = 8
    max_body_bytes: int = 1 << 20
    max_queue: int = 16
    timeout_s: float = 30.0
    retry_after_s: int = 1


class ApiError(SDXSError):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


def error_response(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers
    )


# ---- request bodies ------------------------------------------------------------------------------------
class OpenAIImagesRequest(BaseModel):
    """POST /v1/images/generations. Fields OpenAI defines that do not apply here (quality, style, user)
    are ignored; the ones below are checked strictly (a string is not a number)."""

    model_config = ConfigDict(extra="ignore")
    prompt: StrictStr
    model: StrictStr | None = None
    n: StrictInt = 1
    size: StrictStr | None = None
    response_format: StrictStr = "b64_json"
    seed: StrictInt | None = None
    control_image: StrictStr | None = None


class A1111Request(BaseModel):
    """POST /sdapi/v1/txt2img. `steps` is accepted and reported; the one-step model always runs one."""

    model_config = ConfigDict(extra="ignore")
    prompt: StrictStr
    seed: StrictInt = -1
    width: StrictInt | None = None
    height: StrictInt | None = None
    batch_size: StrictInt = 1
    steps: StrictInt = 1
    override_settings: dict[str, Any] | None = None
    control_image: StrictStr | None = None


# ---- the work a worker runs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One request's generation: `n` images of `prompt`, image i from seed `seeds[i]`."""

    prompt: str
    seeds: tuple[int, ...]
    control: np.ndarray | None
    submitted: float


def run_job(session, job: Job) -> dict:
    """Runs on the entry's worker thread: generate every image, encode PNGs, sum per-component times."""
    from PIL import Image

    from runtimes.base import to_uint8

    started = time.perf_counter()
    batch = int(session.batch)
    pngs: list[bytes] = []
    timings: dict[str, float] = {}
    for i in range(0, len(job.seeds), batch):
        prompts = job.prompt if batch == 1 else [job.prompt] * batch
        res = session.generate_arrays(prompts, seed=job.seeds[i], control_image=job.control)
        for k, v in res.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        for a in to_uint8(res.image)[: len(job.seeds) - i]:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            pngs.append(buf.getvalue())
    done = time.perf_counter()
    return {
        "pngs": pngs,
        "timings_ms": {k: round(v * 1000, 3) for k, v in timings.items()},
        "compute_ms": round(sum(timings.values()) * 1000, 3),
        "queue_ms": round((started - job.submitted) * 1000, 3),
        "worker_ms": round((done - started) * 1000, 3),
    }


# ---- checks -------------------------------------------------------------------------------------------------
def check_prompt(prompt: str, limits: Limits) -> str:
    if len(prompt) > limits.max_prompt_chars:
        raise ApiError(400, f"prompt is {len(prompt)} characters; the limit is {limits.max_prompt_chars}")
    if not prompt.strip():
        raise ApiError(400, "prompt is empty")
    return prompt


def check_count(n: int, field: str, limits: Limits) -> int:
    if not 1 <= n <= limits.max_n:
        raise ApiError(400, f"{field} must be between 1 and {limits.max_n}, got {n}")
    return n


def seeds_for(seed: int | None, n: int) -> tuple[int, ...]:
    """Image i uses seed + i; no seed (or A1111's -1) draws one."""
    if seed is None or seed == -1:
        seed = secrets.randbelow(MAX_SEED - 64)
    if not 0 <= seed <= MAX_SEED - n:
        raise ApiError(400, f"seed must be between 0 and {MAX_SEED - n} (or -1 / absent for a random one), got {seed}")
    return tuple(seed + i for i in range(n))


def decode_control(data: str, resolution: int) -> np.ndarray:
    """A base64 image (optionally a data: URL) -> the ControlNet input, float32 (1, 3, R, R) in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    from sdxs_edge.control import load_control_image

    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "control_image is not valid base64") from None
    try:
        img = Image.open(io.BytesIO(raw))
        if max(img.size) > MAX_CONTROL_SIDE:
            raise ApiError(
                400, f"control_image is {img.size[0]}x{img.size[1]}; the limit is {MAX_CONTROL_SIDE} pixels a side"
            )
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ApiError(400, "control_image is not a readable image (send a base64 PNG or JPEG)") from None
    with warnings.catch_warnings():  # mode conversion and resizing are expected from a browser canvas
        warnings.simplefilter("ignore")
        try:
            return load_control_image(img, resolution)
        except SDXSError as e:
            raise ApiError(400, str(e)) from None


# ---- the app -----------------------------------------------------------------------------------------------
class BodyTooLarge(StarletteHTTPException):
    """Raised while a body streams past the limit (an HTTPException, so FastAPI's body reader passes it on)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes")


class BodyLimit:
    """ASGI middleware: refuse a body over `limit` bytes by its Content-Length, or while it streams."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await error_response(400, "Content-Length is not a number", "invalid_request_error")(
                    scope, receive, send
                )
            if int(length) > self.limit:
                return await error_response(
                    413, f"request body is larger than {self.limit} bytes", "request_too_large"
                )(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


class Server:
    """The loaded entries, their workers and the limits: what the routes share.

    Args:
        entries: the loaded models (`server.models.load_entries`).
        limits: request limits.
        api_key: when set, every API route needs `Authorization: Bearer <api_key>`.
    """

    def __init__(self, entries: list[Entry], limits: Limits = Limits(), api_key: str | None = None):
        self.entries = {e.id: e for e in entries}
        self.limits, self.api_key = limits, api_key
        for e in entries:
            e.worker = Worker(e.id, limits.max_queue)

    def close(self) -> None:
        for e in self.entries.values():
            e.worker.stop()
            e.session.close()

    def pick(self, model: str | None, control: bool) -> Entry:
        """The entry a request names, or the first one that fits (with a ControlNet when a control image came)."""
        if model is not None:
            if model not in self.entries:
                raise ApiError(
                    404, f"model {model!r} is not loaded; loaded: {', '.join(self.entries)}", "model_not_found"
                )
            return self.entries[model]
        fits = [e for e in self.entries.values() if e.has_controlnet == control]
        if not fits:
            raise ApiError(
                400,
                "a control image was sent but no loaded model has a ControlNet"
                if control
                else "every loaded model has a ControlNet: send a control_image",
            )
        return next((e for e in fits if e.style is None), fits[0])

    def check_size(self, entry: Entry, width: int, height: int) -> None:
        r = entry.resolution
        if (width, height) != (r, r):
            raise ApiError(400, f"size {width}x{height} is not supported by model {entry.id!r} (it draws {r}x{r})")

    async def generate(self, entry: Entry, prompt: str, seeds: tuple[int, ...], control_b64: str | None) -> dict:
        if control_b64 is not None and not entry.has_controlnet:
            raise ApiError(400, f"model {entry.id!r} has no ControlNet, so it takes no control_image")
        if control_b64 is None and entry.has_controlnet:
            raise ApiError(
                400, f"model {entry.id!r} has a ControlNet: send a control_image (base64 PNG, white strokes on black)"
            )
        control = decode_control(control_b64, entry.resolution) if control_b64 is not None else None
        t = time.perf_counter()
        try:
            fut = entry.worker.submit(run_job, entry.session, Job(prompt, seeds, control, t))
        except QueueFullError as e:
            raise ApiError(503, str(e), "server_busy", {"Retry-After": str(self.limits.retry_after_s)}) from None
        try:
            out = await asyncio.wait_for(asyncio.wrap_future(fut), self.limits.timeout_s)
        except TimeoutError:
            fut.cancel()
            raise ApiError(
                503,
                f"the request did not finish within {self.limits.timeout_s:g} s; retry shortly",
                "timeout",
                {"Retry-After": str(self.limits.retry_after_s)},
            ) from None
        except SDXSError as e:  # the runtime refused the input (e.g. a control image it cannot use)
            raise ApiError(400, str(e)) from None
        out["total_ms"] = round((time.perf_counter() - t) * 1000, 3)
        return out


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return 400, "request body is not valid JSON"
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "missing" and not loc:
        return 400, "empty body: send a JSON object"
    if first.get("type") in ("model_attributes_type", "dict_type") and not loc:
        return 400, "request body must be a JSON object (Content-Type: application/json)"
    return 422, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"


def create_app(server: Server) -> FastAPI:
    """The FastAPI app over `server` (the caller closes the server after the app stops)."""
    app = FastAPI(title="sdxs-edge", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=server.limits.max_body_bytes)
    page = {route: ((STATIC / name).read_bytes(), media) for route, (name, media) in PAGE_FILES.items()}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, str(exc), exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        status, message = _validation_message(exc)
        return error_response(status, message, "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a backend failure: still JSON, one line
        return error_response(500, f"{type(exc).__name__}: {exc}".splitlines()[0], "server_error")

    def require_key(request: Request) -> None:
        if server.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), server.api_key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key: send Authorization: Bearer KEY",
                "authentication_error",
                {"WWW-Authenticate": "Bearer"},
            )

    for route, (body, media) in page.items():
        app.add_api_route(
            route, (lambda b=body, m=media: Response(b, media_type=m)), methods=["GET"], include_in_schema=False
        )

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "auth": server.api_key is not None,
            "models": len(server.entries),
            "waiting": {k: e.worker.waiting for k, e in server.entries.items()},
        }

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models():
        return {"object": "list", "data": [e.describe() for e in server.entries.values()]}

    @app.post("/v1/images/generations", dependencies=[Depends(require_key)])
    async def openai_images(req: OpenAIImagesRequest):
        lim = server.limits
        prompt = check_prompt(req.prompt, lim)
        n = check_count(req.n, "n", lim)
        if req.response_format != "b64_json":
            raise ApiError(
                400,
                f"response_format {req.response_format!r} is not supported: use b64_json (the server writes no files)",
            )
        entry = server.pick(req.model, req.control_image is not None)
        if req.size is not None:
            w, _, h = req.size.partition("x")
            if not (w.isdigit() and h.isdigit()):
                raise ApiError(
                    400, f"size must be WIDTHxHEIGHT, e.g. {entry.resolution}x{entry.resolution}; got {req.size!r}"
                )
            server.check_size(entry, int(w), int(h))
        seeds = seeds_for(req.seed, n)
        out = await server.generate(entry, prompt, seeds, req.control_image)
        return {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(p).decode()} for p in out["pngs"]],
            "model": entry.id,
            "seeds": list(seeds),
            "size": f"{entry.resolution}x{entry.resolution}",
            "timings_ms": out["timings_ms"],
            "compute_ms": out["compute_ms"],
            "queue_ms": out["queue_ms"],
            "total_ms": out["total_ms"],
        }

    @app.post("/sdapi/v1/txt2img", dependencies=[Depends(require_key)])
    async def a1111_txt2img(req: A1111Request):
        lim = server.limits
        prompt = check_prompt(req.prompt, lim)
        n = check_count(req.batch_size, "batch_size", lim)
        if req.steps < 1:
            raise ApiError(400, f"steps must be >= 1, got {req.steps}")
        model = (req.override_settings or {}).get("sd_model_checkpoint")
        if model is not None and not isinstance(model, str):
            raise ApiError(422, "override_settings.sd_model_checkpoint must be a string")
        entry = server.pick(model, req.control_image is not None)
        r = entry.resolution
        server.check_size(entry, r if req.width is None else req.width, r if req.height is None else req.height)
        seeds = seeds_for(req.seed, n)
        out = await server.generate(entry, prompt, seeds, req.control_image)
        info = {
            "prompt": prompt,
            "all_prompts": [prompt] * n,
            "seed": seeds[0],
            "all_seeds": list(seeds),
            "width": r,
            "height": r,
            "steps": 1,
            "steps_requested": req.steps,
            "batch_size": n,
            "sd_model_name": entry.id,
            "sampler_name": "SDXS one-step",
            "runtime": entry.runtime,
            "timings_ms": out["timings_ms"],
            "compute_ms": out["compute_ms"],
            "queue_ms": out["queue_ms"],
            "total_ms": out["total_ms"],
        }
        params = req.model_dump(exclude={"control_image"})
        return {
            "images": [base64.b64encode(p).decode() for p in out["pngs"]],
            "parameters": params,
            "info": json.dumps(info),
        }

    return app
