"""The server on Ray Serve: a local Ray cluster on 127.0.0.1 (started and stopped by the test), two
replicas behind Ray's proxy, 16 concurrent clients (the official `openai` client), each answered
with its prompt's greedy text from `runtime.load(...).generate` alone."""
from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the dev extra is not installed: pip install -e '.[dev]'")
ray = pytest.importorskip("ray", reason="the serve-ray extra is not installed: pip install -e '.[serve-ray]'")

import runtime  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["ROMEO:", "First Citizen:", "All:", "To be, or not to be", "KING RICHARD III:", "O", "JULIET:",
           "Speak, speak.", "MENENIUS:", "Good night", "HAMLET:", "What, ho!", "LEAR:", "Now", "Friends,", "CORIOLANUS:"]


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
        serve.run(deployment(str(demo), replicas=2, max_batch=8, threads=1, name="demo", api_key="sk-ray"),
                  name="tablefree", route_prefix="/")
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
        replicas = serve.status().applications["tablefree"].deployments["TableFreeServer"].replica_states
        assert replicas.get("RUNNING") == 2, replicas
    finally:
        serve.shutdown()
        ray.shutdown()
