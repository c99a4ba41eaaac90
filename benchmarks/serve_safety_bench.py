"""A 20 MB request against `python -m runtime serve` (issue 19.5): how long until it is refused, how
long /health and a short completion take on other connections meanwhile, and how much the
server's memory grows.

Each case starts a fresh server (a subprocess on 127.0.0.1, a free port) from the checkout given by
--root (default this one: run it once with --root of an older checkout for the before), sends one
request of --size bytes, a valid completions body with one long text prompt, on a raw socket that
reads the answer while it sends (as curl does), and meanwhile GETs /health in a loop and posts one
completion of 4 tokens. The server's RSS (VmRSS) is read before and after, and its peak (VmHWM).

    python benchmarks/serve_safety_bench.py --model artifacts/shakespeare-arith-fp32
    python benchmarks/serve_safety_bench.py --model DIR --root /path/to/old/checkout --cases plain
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # name: (server flags, chunked)
    "plain": ([], False),  # whatever the checkout does by default
    "chunked": ([], True),
    "limit-64MiB": (["--max-body-bytes", str(64 << 20)], False),  # the body is read and parsed
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def get(port: int, method: str, path: str, body: bytes | None = None) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request(method, path, body, {"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    c.close()
    return r.status


def send_big(port: int, body: bytes, chunked: bool, piece: int = 1 << 18) -> dict:
    sock = socket.create_connection(("127.0.0.1", port), timeout=300)
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {len(body)}\r\n\r\n"
    out: dict = {"sent": 0}
    answered = threading.Event()
    t0 = time.perf_counter()

    def read() -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536) or b"\r\n\r\n"
            out["seconds"] = time.perf_counter() - t0
            out["status"] = int(data.split()[1])
            out["answer"] = data.partition(b"\r\n\r\n")[2][:300].decode(errors="replace")
        except (OSError, ValueError, IndexError) as e:
            out["error"] = repr(e)
        answered.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        sock.sendall(head.encode())
        for i in range(0, len(body), piece):
            if answered.is_set():
                break
            part = body[i : i + piece]
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            out["sent"] += len(part)
        else:
            if chunked:
                sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass
    reader.join(300)
    sock.close()
    return out


def run_case(args: argparse.Namespace, name: str) -> dict:
    flags, chunked = CASES[name]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(args.root)}
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--model", str(args.model), "--port", str(port),
                             "--max-batch", "2", "--threads", "1", "--served-model-name", "demo", *flags],
                            cwd=args.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                get(port, "GET", "/health")
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # the peak (VmHWM) counts from here
        before = rss(proc.pid)
        pre, post = b'{"model": "demo", "prompt": "', b'", "max_tokens": 4}'
        body = pre + b"x" * (args.size - len(pre) - len(post)) + post
        got: dict = {}
        small = json.dumps({"model": "demo", "prompt": "ROMEO:", "max_tokens": 4, "temperature": 0}).encode()
        done: dict = {}

        def completion() -> None:
            t = time.perf_counter()
            done["status"] = get(port, "POST", "/v1/completions", small)
            done["seconds"] = time.perf_counter() - t

        big = threading.Thread(target=lambda: got.update(send_big(port, body, chunked)))
        big.start()
        time.sleep(0.02)  # the big request's headers and first bytes are in
        small_t = threading.Thread(target=completion)
        small_t.start()
        health = []
        while big.is_alive() or not health:  # /health on its own connection, alongside
            t = time.perf_counter()
            get(port, "GET", "/health")
            health.append(time.perf_counter() - t)
        big.join()
        small_t.join()
        after = rss(proc.pid)
        return {"case": name, "flags": flags, "chunked": chunked, "size": args.size, "refusal": got,
                "completion_status": done["status"], "completion_s": done["seconds"], "health_max_s": max(health),
                "health_n": len(health), "rss_before": before["VmRSS"], "rss_after": after["VmRSS"],
                "rss_peak_growth": after["VmHWM"] - before["VmRSS"]}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="artifact folder")
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout whose runtime serves (default this one)")
    p.add_argument("--size", type=int, default=20 << 20, help="request body bytes (default 20 MiB)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = p.parse_args()
    for name in args.cases:
        r = run_case(args, name)
        ref = r["refusal"]
        print(f"{args.root.name:>10} {name:>12}: HTTP {ref.get('status')} after {ref.get('seconds', float('nan')):.3f} s "
              f"({ref['sent'] / 2**20:.1f} MiB sent); completion(4) {r['completion_s']:.3f} s HTTP "
              f"{r['completion_status']}; /health max {r['health_max_s']:.3f} s over {r['health_n']}; RSS "
              f"{r['rss_before'] / 2**20:.0f} -> {r['rss_after'] / 2**20:.0f} MiB, peak +{r['rss_peak_growth'] / 2**20:.0f} MiB",
              flush=True)
        print("   ", json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
