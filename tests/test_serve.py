"""`sdxs-edge serve`: the API (both shapes, auth, every bad request), serving behaviour, and the page in
headless Chromium.

The server runs as a user runs it, `python -m sdxs_edge.cli serve BUNDLE ... --port 0`, on loopback, from
an empty working directory (which must stay empty: nothing is written to disk). Its bundles are the
embedded model, its canny ControlNet and its outline LoRA converted to ONNX fp32 once through the same
cache code `serve` uses with no arguments (`cached_bundles`), kept under build/test-bundles/: a few ms
per 64x64 image here, where the int8 ExecuTorch default would take minutes to convert.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from bundle_cache import BUNDLE_CACHE, need, prune, source_key
from PIL import Image

from sdxs_edge.errors import SDXSError

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a large cyan triangle at the bottom left on a black background"
OTHER = "a small red circle at the top right on a white background"
SKETCH = "a large orange square at the center on a black background"
START_TIMEOUT_S = 120


# ---- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundles() -> list[Path]:
    """The default server's bundles (plain, outline LoRA, canny ControlNet, both) as ONNX fp32."""
    need("onnxruntime")
    need("fastapi")
    need("uvicorn")
    from server import models

    root = BUNDLE_CACHE / f"serve-onnx-fp32-{source_key('serve-default-variants')}"
    out = models.cached_bundles(models.default_variants(), root, "onnx", "fp32", log=lambda line: None)
    prune(root, "serve-onnx-fp32-*")
    return out


class Served:
    """A `sdxs-edge serve` subprocess and its URL."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None, start_timeout: float = START_TIMEOUT_S):
        self.stderr_path = cwd.parent / f"{cwd.name}-stderr.txt"
        self.stderr = open(self.stderr_path, "w")
        full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sdxs_edge.cli", "serve", *args, "--port", "0"],
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        line = self._first_line(start_timeout)
        assert "http://127.0.0.1:" in line, line
        self.url = line.split()[2].rstrip("/")

    def _first_line(self, timeout: float) -> str:
        result: list[str] = []
        t = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not result or not result[0]:
            self.proc.kill()
            raise AssertionError(f"the server did not start: {self.stderr_path.read_text()}")
        return result[0]

    def stop(self) -> tuple[int, str]:
        """Ctrl-C, as a person stops it; returns (exit code, the rest of stdout)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.stderr.close()
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("serve-cwd")
    s = Served([str(b) for b in bundles], cwd)
    s.cwd = cwd
    yield s
    code, out = s.stop()
    assert code == 0 and "stopped" in out, (code, out)


@pytest.fixture(scope="module")
def keyed(bundles, tmp_path_factory):
    """A server with an API key from the environment and a queue of one."""
    cwd = tmp_path_factory.mktemp("serve-keyed")
    s = Served([str(bundles[0]), "--queue", "1"], cwd, env={"SDXS_EDGE_API_KEY": "sesame"})
    yield s
    s.stop()


def http(
    url: str, body=None, headers: dict | None = None, method: str | None = None, raw: bytes | None = None
) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request; `body` is sent as JSON, `raw` as it is."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    h = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=h, method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def png(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def edge_map_b64(prompt: str = PROMPT, resolution: int = 64) -> str:
    from sdxs_edge.control import prompt_controls

    a = (prompt_controls([prompt], resolution)[0, 0] * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def good(s: Served) -> None:
    """The next good request still succeeds."""
    code, body, _ = http(s.url + "/v1/images/generations", {"prompt": PROMPT, "seed": 0})
    assert code == 200, body
    assert png(body["data"][0]["b64_json"]).shape == (64, 64, 3)


# ---- the API ------------------------------------------------------------------------------------------------
def test_health_and_models(server):
    code, health, _ = http(server.url + "/health")
    assert code == 200 and health["status"] == "ok" and health["auth"] is False and health["models"] == 4
    code, models, _ = http(server.url + "/v1/models")
    assert code == 200 and models["object"] == "list"
    by_id = {m["id"]: m for m in models["data"]}
    assert set(by_id) == {"sdxs-shapes", "sdxs-shapes-outline", "sdxs-shapes-canny", "sdxs-shapes-canny-outline"}
    assert by_id["sdxs-shapes-canny"]["controlnet"] is True and by_id["sdxs-shapes"]["controlnet"] is False
    assert by_id["sdxs-shapes-outline"]["style"] == "outline" and by_id["sdxs-shapes"]["style"] is None
    assert all(
        m["runtime"] == "onnxruntime" and m["sizes"] == ["64x64"] and m["base"] == "default_model"
        for m in by_id.values()
    )


def test_openai_shape(server):
    url = server.url + "/v1/images/generations"
    code, body, _ = http(
        url, {"prompt": PROMPT, "n": 2, "size": "64x64", "response_format": "b64_json", "seed": 3, "quality": "ignored"}
    )
    assert code == 200, body
    assert body["model"] == "sdxs-shapes" and body["seeds"] == [3, 4] and len(body["data"]) == 2
    a, b = (png(d["b64_json"]) for d in body["data"])
    assert a.shape == (64, 64, 3) and not np.array_equal(a, b)  # two seeds, two images
    assert {"tokenize", "text_encoder", "unet", "decoder"} <= set(body["timings_ms"])
    assert 0 < body["compute_ms"] <= body["total_ms"]
    _, again, _ = http(url, {"prompt": PROMPT, "seed": 3})
    assert np.array_equal(png(again["data"][0]["b64_json"]), a)  # same seed, same image
    _, other, _ = http(url, {"prompt": OTHER, "seed": 3})
    assert not np.array_equal(png(other["data"][0]["b64_json"]), a)


def test_a1111_shape(server):
    code, body, _ = http(
        server.url + "/sdapi/v1/txt2img",
        {
            "prompt": PROMPT,
            "seed": 7,
            "width": 64,
            "height": 64,
            "batch_size": 2,
            "steps": 20,
            "negative_prompt": "",
            "cfg_scale": 7,
        },
    )
    assert code == 200, body
    assert len(body["images"]) == 2 and png(body["images"][0]).shape == (64, 64, 3)
    info = json.loads(body["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8] and info["steps"] == 1 and info["steps_requested"] == 20
    assert info["width"] == info["height"] == 64 and info["sd_model_name"] == "sdxs-shapes"
    assert {"text_encoder", "unet", "decoder"} <= set(info["timings_ms"]) and info["total_ms"] > 0
    assert body["parameters"]["steps"] == 20 and body["parameters"]["batch_size"] == 2
    code, body, _ = http(
        server.url + "/sdapi/v1/txt2img",
        {"prompt": PROMPT, "override_settings": {"sd_model_checkpoint": "sdxs-shapes-outline"}},
    )
    assert code == 200 and json.loads(body["info"])["sd_model_name"] == "sdxs-shapes-outline"
    assert 0 <= json.loads(body["info"])["seed"] < 2**32  # -1 (the default) draws a seed and reports it


def test_control_image_drives_the_controlnet(server):
    url = server.url + "/v1/images/generations"
    triangle = {"prompt": PROMPT, "seed": 0, "control_image": edge_map_b64(PROMPT)}
    code, body, _ = http(url, triangle)
    assert code == 200 and body["model"] == "sdxs-shapes-canny", body  # a control image picks a ControlNet model
    assert "controlnet" in body["timings_ms"]
    circle = {
        **triangle,
        "control_image": "data:image/png;base64," + edge_map_b64(OTHER),
    }  # a data: URL, as the page sends
    _, other, _ = http(url, circle)
    assert not np.array_equal(png(body["data"][0]["b64_json"]), png(other["data"][0]["b64_json"]))
    code, a1111, _ = http(
        server.url + "/sdapi/v1/txt2img",
        {
            "prompt": PROMPT,
            "control_image": triangle["control_image"],
            "override_settings": {"sd_model_checkpoint": "sdxs-shapes-canny-outline"},
        },
    )
    assert code == 200 and len(a1111["images"]) == 1


def test_page_is_served_and_self_contained(server):
    for path, kind in (("/", "text/html"), ("/app.js", "javascript"), ("/style.css", "text/css")):
        with urllib.request.urlopen(server.url + path, timeout=30) as r:
            text = r.read().decode()
            assert r.status == 200 and kind in r.headers["content-type"]
        assert "http://" not in text and "https://" not in text and "//cdn" not in text  # nothing from the network
    assert 'id="prompt"' in urllib.request.urlopen(server.url + "/", timeout=30).read().decode()


def png_b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ---- bad requests: each a JSON 4xx, and the server keeps serving ---------------------------------------------
OPENAI = "/v1/images/generations"
A1111 = "/sdapi/v1/txt2img"
BAD = [
    ("empty body", OPENAI, b"", 400, "empty body"),
    ("invalid JSON", OPENAI, b'{"prompt": ', 400, "not valid JSON"),
    ("not an object", OPENAI, b"[1, 2]", 400, "JSON object"),
    ("prompt of the wrong type", OPENAI, {"prompt": 5}, 422, "prompt"),
    ("n of the wrong type", OPENAI, {"prompt": PROMPT, "n": "two"}, 422, "n:"),
    ("seed of the wrong type", A1111, {"prompt": PROMPT, "seed": "x"}, 422, "seed"),
    ("n = 0", OPENAI, {"prompt": PROMPT, "n": 0}, 400, "n must be between 1 and 8"),
    ("n = 1000", OPENAI, {"prompt": PROMPT, "n": 1000}, 400, "n must be between 1 and 8"),
    ("batch_size = 1000", A1111, {"prompt": PROMPT, "batch_size": 1000}, 400, "batch_size"),
    ("unsupported size", OPENAI, {"prompt": PROMPT, "size": "512x512"}, 400, "not supported"),
    ("malformed size", OPENAI, {"prompt": PROMPT, "size": "big"}, 400, "WIDTHxHEIGHT"),
    ("unsupported width", A1111, {"prompt": PROMPT, "width": 128}, 400, "not supported"),
    ("prompt of 100 kB", OPENAI, {"prompt": "a" * 100_000}, 400, "prompt is 100000 characters"),
    (
        "control image that is not an image",
        OPENAI,
        {"prompt": PROMPT, "control_image": base64.b64encode(b"not a picture").decode()},
        400,
        "not a readable image",
    ),
    ("control image that is not base64", OPENAI, {"prompt": PROMPT, "control_image": "%%%"}, 400, "not valid base64"),
    (
        "control image for a model without ControlNet",
        OPENAI,
        {"prompt": PROMPT, "model": "sdxs-shapes", "control_image": edge_map_b64()},
        400,
        "no ControlNet",
    ),
    (
        "ControlNet model without a control image",
        OPENAI,
        {"prompt": PROMPT, "model": "sdxs-shapes-canny"},
        400,
        "send a control_image",
    ),
    ("model id not loaded", OPENAI, {"prompt": PROMPT, "model": "sdxs-512"}, 404, "not loaded"),
    (
        "model id that is a path",
        A1111,
        {"prompt": PROMPT, "override_settings": {"sd_model_checkpoint": "../../etc/passwd"}},
        404,
        "not loaded",
    ),
    ("response_format url", OPENAI, {"prompt": PROMPT, "response_format": "url"}, 400, "b64_json"),
    ("negative seed", OPENAI, {"prompt": PROMPT, "seed": -5}, 400, "seed must be"),
    ("body over the limit", OPENAI, b"LARGE", 413, "larger than"),
    ("override_settings of the wrong type", A1111, {"prompt": PROMPT, "override_settings": "x"}, 422, "override"),
    (
        "model id of the wrong type",
        A1111,
        {"prompt": PROMPT, "override_settings": {"sd_model_checkpoint": 3}},
        422,
        "must be a string",
    ),
    ("steps = 0", A1111, {"prompt": PROMPT, "steps": 0}, 400, "steps must be"),
    ("blank prompt", OPENAI, {"prompt": "   "}, 400, "prompt is empty"),
    (
        "control image over the pixel limit",
        OPENAI,
        {"prompt": PROMPT, "control_image": png_b64(Image.new("L", (5000, 2)))},
        400,
        "4096 pixels a side",
    ),
]


def post_large(url: str, size: int = 2 << 20) -> tuple[int, dict]:
    """Announce a body over the limit, send its first bytes and read the answer (the server answers
    before the rest arrives, so urllib would hit a closed pipe sending it all)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % size
            + b'{"prompt": "'
        )
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < int(
            reply.lower().partition(b"content-length: ")[2].split(b"\r\n")[0] or 0
        ):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("name,route,body,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_request(server, name, route, body, status, message):
    if body == b"LARGE":
        code, reply = post_large(server.url)
    else:
        raw = body if isinstance(body, bytes) else None
        code, reply, _ = http(server.url + route, None if raw is not None else body, raw=raw, method="POST")
    assert code == status, reply
    assert reply["error"]["code"] == status and message in reply["error"]["message"], reply
    assert "\n" not in reply["error"]["message"]
    good(server)
    assert not any(server.cwd.iterdir())  # nothing written to disk


def test_unknown_route_and_method_are_json(server):
    code, reply, _ = http(server.url + "/v1/nothing")
    assert code == 404 and reply["error"]["code"] == 404
    code, reply, _ = http(server.url + "/v1/images/generations", method="GET")
    assert code == 405 and reply["error"]["code"] == 405


def test_client_that_disconnects_mid_request(server):
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": PROMPT, "n": 8}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:  # half a body, then gone
        s.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(body)
            + body[:10]
        )
    with socket.create_connection((host, int(port)), timeout=10) as s:  # a whole request, gone before the answer
        s.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(body)
            + body
        )
    time.sleep(0.5)
    assert server.proc.poll() is None
    good(server)
    assert "Traceback" not in server.stderr_path.read_text()


# ---- auth, queue ------------------------------------------------------------------------------------------
def test_api_key(keyed):
    code, health, _ = http(keyed.url + "/health")
    assert code == 200 and health["auth"] is True  # health and the page stay open
    assert urllib.request.urlopen(keyed.url + "/", timeout=30).status == 200
    for route, body in (("/v1/models", None), (OPENAI, {"prompt": PROMPT}), (A1111, {"prompt": PROMPT})):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            code, reply, h = http(keyed.url + route, body, headers)
            assert (
                code == 401
                and "API key" in reply["error"]["message"]
                and h.get("www-authenticate", h.get("WWW-Authenticate")) == "Bearer"
            )
        code, reply, _ = http(keyed.url + route, body, {"Authorization": "Bearer sesame"})
        assert code == 200, reply


def test_full_queue_is_503_with_retry_after(keyed):
    results: list[tuple[int, dict]] = []

    def one():
        code, _, h = http(keyed.url + OPENAI, {"prompt": PROMPT, "n": 8}, {"Authorization": "Bearer sesame"})
        results.append((code, h))

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = sorted(c for c, _ in results)
    assert len(codes) == 12 and set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    assert all(h.get("retry-after", h.get("Retry-After")) == "1" for c, h in results if c == 503)
    code, _, _ = http(keyed.url + OPENAI, {"prompt": PROMPT}, {"Authorization": "Bearer sesame"})
    assert code == 200


def test_worker_queue_is_bounded():
    from server.worker import QueueFullError, Worker

    gate = threading.Event()
    w = Worker("t", max_queue=1)
    running = w.submit(gate.wait, 10)
    time.sleep(0.2)  # the first job is now running, not waiting
    waiting = w.submit(lambda: "second")
    with pytest.raises(QueueFullError):
        w.submit(lambda: "third")
    gate.set()
    assert running.result(10) is True and waiting.result(10) == "second"
    w.stop()


def test_request_that_times_out_is_503_with_retry_after():
    import asyncio

    pytest.importorskip("fastapi")
    from server.app import ApiError, Limits, Server
    from server.models import Entry

    class Slow:  # a session that takes longer than the timeout
        has_controlnet, batch, manifest = False, 1, {"resolution": 64}

        def generate_arrays(self, prompt, seed=0, control_image=None):
            time.sleep(0.5)
            raise AssertionError("not reached in time")

        def close(self):
            pass

    server = Server([Entry("slow", Path("."), "stub", Slow(), "stub", None, 0.0)], Limits(timeout_s=0.05))
    try:
        with pytest.raises(ApiError) as e:
            asyncio.run(server.generate(server.pick(None, False), PROMPT, (0,), None))
        assert (
            e.value.status == 503
            and e.value.headers == {"Retry-After": "1"}
            and "did not finish within 0.05 s" in str(e.value)
        )
    finally:
        server.close()


@pytest.mark.parametrize("models", ["bundle", "none"])
def test_port_in_use_is_one_line(bundles, tmp_path, models):
    """A bundle, or no argument (the default, which would convert into an empty cache): the port is
    checked first, so the error comes at once and the cache stays empty."""
    args = [str(bundles[0])] if models == "bundle" else ["--cache", str(tmp_path)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "sdxs_edge.cli", "serve", *args, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())


def test_connections_are_tcp_nodelay():
    """The server's connections send each write at once: with Nagle on, a kept-alive client waited for a
    delayed ACK between a response's header and body writes (tens of ms per request)."""
    import asyncio

    from server.cli import bind

    sock = bind("127.0.0.1", 0)

    async def accepted_nodelay() -> int:
        got = asyncio.get_running_loop().create_future()

        def on_connection(reader, writer):
            got.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connection, sock=sock)  # as uvicorn serves a given socket
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(got, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_not_a_bundle_is_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "sdxs_edge.cli", "serve", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "neither a bundle folder" in r.stderr, r.stderr


def test_cache_is_reused(bundles, monkeypatch):
    from server import models

    monkeypatch.setattr(models, "_convert", lambda *a: pytest.fail("a cached bundle was converted again"))
    lines: list[str] = []
    root = bundles[0].parents[2]
    again = models.cached_bundles(models.default_variants(), root, "onnx", "fp32", log=lines.append)
    assert again == bundles and len(lines) == 4 and all("from the cache" in line for line in lines)


def test_default_start_reuses_the_cache(bundles, tmp_path):
    """`serve` with no model argument serves the embedded model's four variants from a cache folder that
    already holds them: it starts without converting (a line per bundle says so)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    root = bundles[0].parents[2]
    t = time.perf_counter()
    s = Served(["--cache", str(root), "--target", "onnx", "--precision", "fp32"], cwd)
    started_s = time.perf_counter() - t
    try:
        code, health, _ = http(s.url + "/health")
        assert code == 200 and health["models"] == 4
        good(s)
    finally:
        code, out = s.stop()
    err = s.stderr_path.read_text()
    assert code == 0 and "stopped" in out, (code, out)
    assert err.count("from the cache") == 4 and "converting" not in err, err
    assert started_s < 60, started_s  # seconds, where converting the four variants takes minutes
    assert not any(cwd.iterdir())


@pytest.mark.slow
def test_no_arguments_on_a_fresh_cache_converts_once_then_reuses(tmp_path):
    """`serve` exactly as `make serve` runs it (no model, no target): the four variants of the embedded
    model converted to ExecuTorch int8 into an empty cache (tens of minutes on 2 cores), every one served;
    the second start converts nothing."""
    need("executorch")
    env = {"SDXS_EDGE_CACHE": str(tmp_path / "cache")}
    for start in ("first", "second"):
        cwd = tmp_path / f"cwd-{start}"
        cwd.mkdir()
        t = time.perf_counter()
        s = Served([], cwd, env=env, start_timeout=3600)
        started_s = time.perf_counter() - t
        try:
            _, listed, _ = http(s.url + "/v1/models")
            ids = [m["id"] for m in listed["data"]]
            assert len(ids) == 4, ids
            for model in ids:
                body = {"model": model, "prompt": PROMPT, "seed": 0}
                if "canny" in model:
                    body["control_image"] = edge_map_b64(PROMPT)
                code, out, _ = http(s.url + "/v1/images/generations", body)
                assert code == 200 and len(out["data"]) == 1, (model, code, out)
        finally:
            code, out = s.stop()
        err = s.stderr_path.read_text()
        assert code == 0 and "stopped" in out, (code, out)
        print(f"{start} start: serving after {started_s:.0f} s")
        if start == "first":
            assert err.count("converting") == 4 and err.count("converted in") == 4, err
        else:
            assert err.count("from the cache") == 4 and "converting" not in err, err
            assert started_s < 120, started_s


def test_default_target_is_the_fastest_installed(monkeypatch):
    import importlib.util

    from server import models

    real = importlib.util.find_spec
    have = lambda *missing: lambda name, *a: None if name in missing else real(name, *a)  # noqa: E731
    if real("executorch") is not None:
        assert models.fastest_target() == ("executorch", "int8")
    monkeypatch.setattr(importlib.util, "find_spec", have("executorch"))
    assert models.fastest_target() == ("onnx", "int8")
    monkeypatch.setattr(importlib.util, "find_spec", have("executorch", "onnxruntime"))
    with pytest.raises(SDXSError, match="no CPU runtime"):
        models.fastest_target()


def test_several_runtimes_make_one_entry_each(bundles):
    from server.models import load_entries

    entries = load_entries([bundles[1]], ["onnxruntime", "torch"], log=lambda line: None)
    try:
        assert [e.id for e in entries] == ["sdxs-shapes-outline@onnxruntime", "sdxs-shapes-outline@torch"]
        assert [e.describe()["runtime"] for e in entries] == ["onnxruntime", "torch"] and all(
            e.style == "outline" for e in entries
        )
        a, b = (e.session.generate_arrays(PROMPT, seed=0).image for e in entries)
        assert np.abs(a - b).max() < 0.05  # the same bundle on two runtimes: the same picture (fp32)
    finally:
        for e in entries:
            e.session.close()


def test_server_imports_no_torch(bundles):
    code = (
        "import sys, sdxs_edge.cli, server.app, server.cli, runtimes.onnxruntime_session; print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


# ---- the page in headless Chromium -----------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (`make install` installs them)")
    need("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1000,900",
    ):
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _wait(predicate, timeout: float = 30.0, what: str = "the page"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_page_in_chromium(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(server.url + "/")
    out = d.find_element(By.ID, "output")
    count = lambda: int(out.get_attribute("data-count"))  # noqa: E731
    _wait(lambda: count() >= 1, what="the first image")
    first = out.get_attribute("src")

    # Type a prompt: the image changes as you type (debounced), with timings under it.
    box = d.find_element(By.ID, "prompt")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(OTHER)
    typed = time.time()
    idle = lambda: d.execute_script("return !state.busy && !state.again")  # noqa: E731
    _wait(lambda: out.get_attribute("src") != first and idle(), what="the image for the typed prompt")
    typed_s = time.time() - typed
    typed_src = out.get_attribute("src")
    assert typed_src != first
    stats = d.find_element(By.ID, "stats").text
    assert "unet" in stats and "img/s" in stats, stats
    print(f"typed prompt -> image on the page in {typed_s:.2f} s (including the 0.12 s debounce)")
    assert (
        typed_s < 2.0
    )  # the goal is 1 s on 2 idle cores (0.33 s measured); the bound leaves room for a shared machine

    # Sketch: switch to the ControlNet model and draw a stroke; the picture follows it.
    d.find_element(By.ID, "mode-sketch").click()
    _wait(lambda: d.find_element(By.ID, "sketch").is_displayed(), what="the sketch canvas")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(SKETCH)
    _wait(
        lambda: (
            idle()
            and "sdxs-shapes-canny" in d.find_element(By.ID, "stats").text
            and box.get_attribute("value") == SKETCH
        ),
        what="the sketch-mode image",
    )
    time.sleep(0.3)  # past the debounce
    _wait(idle, what="the sketch-mode image")
    before = out.get_attribute("src")
    canvas = d.find_element(By.ID, "sketch")
    chain = ActionChains(d).move_to_element_with_offset(canvas, -60, -60).click_and_hold()  # a square round the centre
    for dx, dy in (
        (40, 0),
        (40, 0),
        (40, 0),
        (0, 40),
        (0, 40),
        (0, 40),
        (-40, 0),
        (-40, 0),
        (-40, 0),
        (0, -40),
        (0, -40),
        (0, -40),
    ):
        chain = chain.move_by_offset(dx, dy)
    chain.release().perform()
    _wait(lambda: out.get_attribute("src") != before and idle(), what="the image for the sketch")
    lit = d.execute_script(
        "const c=document.getElementById('sketch'); const a=c.getContext('2d').getImageData(0,0,c.width,c.height).data; let n=0; for (let i=0;i<a.length;i+=4) n+=a[i]>128; return n;"
    )
    assert lit > 200, lit  # the stroke is on the canvas
    assert d.find_element(By.ID, "error").text == ""
    assert len(d.find_elements(By.CSS_SELECTOR, "#history img")) >= 3

    shot = tmp_path / "app.png"
    d.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert im.size[0] >= 800 and np.asarray(im.convert("L")).std() > 10
    if os.environ.get("SDXS_EDGE_SCREENSHOT"):  # SDXS_EDGE_SCREENSHOT=docs/img/app.png keeps it for the docs
        shutil.copy(shot, os.environ["SDXS_EDGE_SCREENSHOT"])
