"""`python -m runtime web` (issue 12, item 4): the page runs the artifact in headless Chromium with
onnxruntime-web (WASM) and streams the Python runtime's greedy tokens, on both graphs and in every
lift mode; the server binds 127.0.0.1, serves a fixed list of files and says in one line what is
missing. The browser tests need `make setup-js` (node, tests/js/node_modules, Debian's chromium):
they skip without it and fail where CI is set; the server tests need nothing.
"""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from jsfront import NEW_TOKENS, PROMPTS, ROOT, demo_artifact, need, node, prompt_ids, runtime_ids

SERVER_START_S = 60


@pytest.fixture
def fake_ort(tmp_path) -> Path:
    from runtime.web import ORT_FILES

    for f in ORT_FILES:
        (tmp_path / f).write_bytes(b"//")
    return tmp_path


@pytest.fixture
def fake_model(tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "manifest.json"):
        (folder / f).write_text("{}")
    (folder / "model.onnx").write_bytes(b"onnx")
    (folder.parent / "secret.txt").write_text("not served")
    return folder


def _get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), b""


def test_server_serves_the_page_the_artifact_and_nothing_else(fake_model, fake_ort):
    import threading

    from runtime.web import make_server

    httpd = make_server(fake_model, port=0, ort_dir=fake_ort)
    host, port = httpd.server_address[:2]
    assert host == "127.0.0.1"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://{host}:{port}"
        status, headers, body = _get(base + "/")
        assert status == 200 and b"app.mjs" in body
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"  # threaded WASM needs isolation
        status, headers, body = _get(base + "/model/model.onnx")
        assert (status, body) == (200, b"onnx")
        status, _, body = _get(base + "/artifact.json")
        assert json.loads(body) == {"name": "model", "graphs": ["model.onnx"], "data_file": "model.onnx.data"}
        assert _get(base + "/ort/ort-wasm-simd-threaded.wasm")[1]["Content-Type"] == "application/wasm"
        for path in ("/model/../secret.txt", "/model/%2e%2e/secret.txt", "/model/model.onnx.data", "/jsfront.py",
                     "/ort/../model/model.onnx/../../secret.txt"):
            assert _get(base + path)[0] == 404, path
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_cli_says_in_one_line_how_to_get_onnxruntime_web(fake_model, tmp_path):
    p = subprocess.run([sys.executable, "-m", "runtime", "web", "--model", str(fake_model), "--ort-dir", str(tmp_path),
                        "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "make setup-js" in lines[0] and "--ort-dir" in lines[0], p.stderr


def test_cli_refuses_a_folder_without_an_artifact(tmp_path, fake_ort):
    p = subprocess.run([sys.executable, "-m", "runtime", "web", "--model", str(tmp_path), "--ort-dir", str(fake_ort)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "config.json" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.fixture(scope="module")
def browser_env():
    return need(node_packages=("onnxruntime-web", "puppeteer-core"), chromium=True)


def _serve(folder: Path) -> tuple[subprocess.Popen, str]:
    """`python -m runtime web` on a free port; its address (the first stdout line)."""
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "web", "--model", str(folder), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout=SERVER_START_S):
        proc.kill()
        raise AssertionError(f"python -m runtime web printed no address in {SERVER_START_S} s: {proc.stderr.read()}")
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise AssertionError(f"python -m runtime web did not start: {url!r} {proc.stderr.read()}")
    return proc, url


@pytest.mark.parametrize("mode", ["arith", pytest.param("bitwise", marks=pytest.mark.slow),
                                  pytest.param("lookup", marks=pytest.mark.slow)])
def test_page_in_headless_chromium_streams_the_runtime_tokens(browser_env, mode):
    import runtime

    folder = demo_artifact(mode)
    want = runtime_ids(mode)
    decode = runtime.load(folder, provider="cpu").decode
    proc, url = _serve(folder)
    try:
        graphs = ["model.kv.onnx", "model.onnx"]
        out = node("web_page.mjs", url, ",".join(graphs), str(NEW_TOKENS), "-", *PROMPTS, env=browser_env)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert len(out) == len(graphs) * len(PROMPTS)
    for k, r in enumerate(out):
        graph, prompt = graphs[k // len(PROMPTS)], PROMPTS[k % len(PROMPTS)]
        assert "error" not in r, f"{mode} {graph}: the page reported {r['error']}"
        assert r["graph"] == graph and r["greedy"]
        assert r["prompt_ids"] == prompt_ids(mode)[k % len(PROMPTS)]
        assert r["ids"] == want[k % len(PROMPTS)], f"{mode} {graph} {prompt!r}: the page's tokens differ from the runtime's"
        assert r["text"] == decode(r["ids"])  # the streamed text


def test_page_samples_reproducibly_and_top_k_1_is_greedy(browser_env):
    folder = demo_artifact("arith")
    want = runtime_ids("arith")[0][:20]
    proc, url = _serve(folder)
    try:
        both = "model.kv.onnx,model.onnx"
        top1 = node("web_page.mjs", "--sample=1.0,1,3", url, both, "20", "-", PROMPTS[0], env=browser_env)
        seed5 = node("web_page.mjs", "--sample=0.8,50,5", url, both, "20", "-", PROMPTS[0], env=browser_env)
        seed6 = node("web_page.mjs", "--sample=0.8,50,6", url, "model.kv.onnx", "20", "-", PROMPTS[0], env=browser_env)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert all(not r["greedy"] and "error" not in r for r in top1 + seed5 + seed6)
    assert [r["ids"] for r in top1] == [want, want], "top-k 1 keeps only the argmax: sampling must equal greedy"
    assert seed5[0]["ids"] == seed5[1]["ids"], "one seed, same logits on both graphs: the same draws"
    assert seed5[0]["ids"] != seed6[0]["ids"] and seed5[0]["ids"] != want, "another seed should draw other tokens"
