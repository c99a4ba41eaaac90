"""`python -m runtime web`: a small page that runs an artifact in the browser with onnxruntime-web.

Why a server at all: a browser fetches the graphs, the weights and the WASM build of ONNX Runtime
over HTTP, and threaded WASM needs cross-origin isolation headers that a `file://` page cannot
have. The page itself (index.html, app.mjs, tablefree.mjs beside this file) does the work; this
module only serves three read-only places: the page, the artifact's files (a fixed list, never a
path the browser picks) and the onnxruntime-web files from a local install. Nothing is downloaded
at run time. The standard library's http.server is enough for one user on 127.0.0.1.
"""
from __future__ import annotations

import http.server
import json
import sys
from functools import partial
from pathlib import Path

from ..errors import InputError, MissingDependencyError, RuntimeArtifactError
from ..interface import CONFIG_FILE, DATA_FILE, GENERATION_CONFIG_FILE, KV_MODEL_FILE, MANIFEST_FILE, MODEL_FILE

PAGE_DIR = Path(__file__).resolve().parent
PAGE_FILES = ("index.html", "app.mjs", "tablefree.mjs")
ARTIFACT_FILES = (CONFIG_FILE, GENERATION_CONFIG_FILE, MANIFEST_FILE, "tokenizer.json", MODEL_FILE, KV_MODEL_FILE, DATA_FILE)
# onnxruntime-web's WASM-only build: the API module, then the Emscripten glue and the binary it loads
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
# where `make setup-js` installs the npm package, from a checkout
DEFAULT_ORT_DIR = PAGE_DIR.parents[1] / "tests" / "js" / "node_modules" / "onnxruntime-web" / "dist"
TYPES = {".html": "text/html; charset=utf-8", ".mjs": "text/javascript; charset=utf-8", ".json": "application/json",
         ".wasm": "application/wasm", ".onnx": "application/octet-stream", ".data": "application/octet-stream"}


def find_ort_dir(ort_dir: str | Path | None) -> Path:
    """The folder holding ORT_FILES, or a one-line error that says how to get them."""
    folder = Path(ort_dir) if ort_dir is not None else DEFAULT_ORT_DIR
    missing = [f for f in ORT_FILES if not (folder / f).is_file()]
    if missing:
        raise MissingDependencyError(
            f"onnxruntime-web files {', '.join(missing)} not found in {folder}: run `make setup-js` (installs the npm "
            "package under tests/js) or pass --ort-dir with the dist/ folder of an onnxruntime-web install")
    return folder


def _check_model(model: Path) -> dict:
    if not (model / CONFIG_FILE).is_file() or not (model / MODEL_FILE).is_file():
        raise RuntimeArtifactError(f"{model} has no {CONFIG_FILE} and {MODEL_FILE}: pass the folder that "
                                   "`python -m export build` wrote")
    if not (model / "tokenizer.json").is_file():
        raise RuntimeArtifactError(f"{model} has no tokenizer.json, which the page needs to turn text into tokens; "
                                   "re-export with the checkpoint's tokenizer files")
    return json.loads((model / CONFIG_FILE).read_text(encoding="utf-8"))


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "tablefree-web"

    def __init__(self, *args, routes: dict[str, Path | bytes], **kw):
        self.routes = routes
        super().__init__(*args, **kw)

    def _send(self, path: Path | bytes | None, head: bool = False) -> None:
        if isinstance(path, bytes):  # generated JSON
            body, kind = path, "application/json"
        elif path is None or not path.is_file():
            self.send_error(404)
            return
        else:
            body, kind = None, TYPES.get(path.suffix, "application/octet-stream")
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body) if body is not None else path.stat().st_size))
        self.send_header("Cache-Control", "no-cache")
        # cross-origin isolation: SharedArrayBuffer, so onnxruntime-web runs its WASM threads
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.end_headers()
        if head:
            return
        if body is not None:
            self.wfile.write(body)
            return
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                self.wfile.write(chunk)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._send(self.routes.get(self.path.split("?", 1)[0]))

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(self.routes.get(self.path.split("?", 1)[0]), head=True)

    def log_request(self, code: object = "-", size: object = "-") -> None:
        pass  # requests are not news; send_error still reports failures on stderr


def make_server(model: str | Path, host: str = "127.0.0.1", port: int = 8000,
                ort_dir: str | Path | None = None) -> http.server.ThreadingHTTPServer:
    """A server for the page and `model` (port 0 picks a free port); raises RuntimeArtifactError or
    MissingDependencyError before binding when the artifact or onnxruntime-web is missing, InputError
    when the port is taken."""
    model = Path(model)
    _check_model(model)
    ort = find_ort_dir(ort_dir)
    # what the page needs to know of the folder: the graphs it has and the weights file they name
    graphs = [g for g in (KV_MODEL_FILE, MODEL_FILE) if (model / g).is_file()]
    about = {"name": model.resolve().name, "graphs": graphs, "data_file": DATA_FILE}
    routes: dict[str, Path | bytes] = {"/": PAGE_DIR / "index.html", "/artifact.json": json.dumps(about).encode()}
    routes.update({f"/{f}": PAGE_DIR / f for f in PAGE_FILES})
    routes.update({f"/model/{f}": model / f for f in ARTIFACT_FILES if (model / f).is_file()})
    routes.update({f"/ort/{f}": ort / f for f in ORT_FILES})
    try:
        return http.server.ThreadingHTTPServer((host, port), partial(_Handler, routes=routes))
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e}): pass another --port, or 0 for a free one") from None


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, ort_dir: str | Path | None = None) -> None:
    """Serve the page until interrupted, printing its address on stdout (first line)."""
    httpd = make_server(model, host, port, ort_dir)
    h, p = httpd.server_address[:2]
    print(f"http://{h}:{p}/", flush=True)
    print(f"[runtime] serving {model} for the browser (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
