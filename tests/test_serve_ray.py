"""The server on Ray Serve: a local Ray cluster on 127.0.0.1 (started and stopped by the test), two
replicas behind Ray's proxy, 16 concurrent clients (the official `openai` client), each answered
with its prompt's greedy text from `runtime.load(...).generate` alone; the replicas built from the
command line's flags (the key, no prefix cache) and seen to honour them.

Without starting Ray: every `serve` flag but the launcher's reaches the options each replica is
bound with, by `--ray` and by `serve run`'s key=value pairs alike."""
from __future__ import annotations

import argparse
import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the dev extra is not installed: pip install -e '.[dev]'")
ray = pytest.importorskip("ray", reason="the serve-ray extra is not installed: pip install -e '.[serve-ray]'")

import runtime  # noqa: E402
from runtime.serve.options import LAUNCH_FLAGS, ServeOptions, add_flags  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["ROMEO:", "First Citizen:", "All:", "To be, or not to be", "KING RICHARD III:", "O", "JULIET:",
           "Speak, speak.", "MENENIUS:", "Good night", "HAMLET:", "What, ho!", "LEAR:", "Now", "Friends,", "CORIOLANUS:"]



def _options(*argv: str) -> ServeOptions:
    p = argparse.ArgumentParser()
    add_flags(p)
    return ServeOptions.from_args(p.parse_args(list(argv)))


# a value other than the default for every flag a replica honours (None: a switch)
OTHER = {"model": "elsewhere", "max_batch": "3", "max_queue": "5", "max_len": "64", "max_prefill_tokens": "7",
         "no_prefix_cache": None, "prefix_cache_mb": "2", "threads": "1", "provider": "cuda",
         "served_model_name": "x", "shutdown_timeout": "3", "api_key": "sk-x", "max_body_bytes": "1000"}


def test_every_serve_flag_reaches_the_replicas_options(monkeypatch):
    from runtime.serve.ray_app import build_app, deployment

    monkeypatch.delenv("TABLEFREE_API_KEY", raising=False)
    p = argparse.ArgumentParser()
    add_flags(p)
    flags = set(vars(p.parse_args(["--model", "m"])))
    assert flags == set(OTHER) | set(LAUNCH_FLAGS), "a new serve flag: add it to OTHER (and to ServeOptions)"
    base = _options("--model", "m")
    assert deployment(base, replicas=1)._bound_deployment.init_args == (base,)
    for key, value in OTHER.items():
        flag = "--" + key.replace("_", "-")
        opts = _options("--model", "m", flag, *([] if value is None else [value])) if key != "model" else \
            _options("--model", value)
        assert opts != base, key
        kv = {"model": "m", key: "true" if value is None else value}
        app = build_app(kv)._bound_deployment  # `serve run`'s form
        assert app.init_args == (opts,), key
        assert app._deployment_config.graceful_shutdown_timeout_s == opts.shutdown_timeout
        assert build_app({**kv, "replicas": "3"})._bound_deployment.num_replicas == 3
    assert build_app({"model": "m", "name": "x"})._bound_deployment.init_args == (_options("--model", "m",
                                                                                           "--served-model-name", "x"),)
    for bad, says in (({"model": "m", "frob": "1"}, "unrecognized arguments: --frob"),
                      ({"model": "m", "no_prefix_cache": "maybe"}, "give true or false"),
                      ({"model": "m", "port": "1"}, "serve run` places the proxy"),
                      ({"model": "m", "prefix_cache_mb": "-1"}, "--prefix-cache-mb must be >= 0")):
        with pytest.raises(ValueError, match=re.escape(says)):
            build_app(bad)


@pytest.mark.slow
def test_two_replicas_answer_sixteen_concurrent_clients(tmp_path_factory):
    from ray import serve

    from demo import demo_artifact
    from runtime.serve.ray_app import deployment

    demo = demo_artifact("arith")
    model = runtime.load(demo, provider="cpu", graph="kv", threads=1)
    want = [model.generate(p, max_new_tokens=24).text for p in PROMPTS]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, runtime_env={"env_vars": env},
             _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = _options("--model", str(demo), "--max-batch", "8", "--threads", "1", "--served-model-name", "demo",
                           "--api-key", "sk-ray", "--no-prefix-cache")
        serve.run(deployment(options, replicas=2), name="tablefree", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-ray", max_retries=0, timeout=120)
        with pytest.raises(openai.AuthenticationError):  # the key reaches the replicas' apps
            client.with_options(api_key="sk-other").models.list()

        def ask(i: int) -> str:
            kw = dict(model="demo", prompt=PROMPTS[i], max_tokens=24, temperature=0)
            if i % 2:
                return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
            return client.completions.create(**kw).choices[0].text

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(ask, range(16)))
        assert got == want
        pages = [_metrics(port) for _ in range(4)]  # whichever replicas answer: none has a prefix cache
        assert all("tablefree_prefix_cache_queries_total 0.0" in text for text in pages), pages
        assert any(re.search(r'tablefree_requests_total\{finish="\w+"\} [1-9]', text) for text in pages), pages
        replicas = serve.status().applications["tablefree"].deployments["TableFreeServer"].replica_states
        assert replicas.get("RUNNING") == 2, replicas
    finally:
        serve.shutdown()
        ray.shutdown()


def _metrics(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:  # (open: no key needed)
        return r.read().decode()
