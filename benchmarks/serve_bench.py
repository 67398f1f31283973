"""`dgx-emu serve` under load, end to end: start a server, run `dgx-emu bench serve` on it, stop it.

    python benchmarks/serve_bench.py --out benchmarks/results/serve_cpu_world8.json \\
        [--concurrency 1,4,16 --requests 32 --max-tokens 64] -- --world-size 8 [more serve flags]

The server runs as users run it (`python -m launch serve ... --port 0`, loopback), in its own
process; the load generator runs in another, so the client's work does not share the server's
interpreter. The JSON is bench serve's, plus the server's command line and the machine. Every
step is bounded: the server must be ready within --start-timeout, each level within bench serve's
--duration-s, and the server must exit within 60 s of SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ready_url(proc: subprocess.Popen, timeout_s: float) -> str:
    """The URL of the server's ready line ('serving NAME at http://HOST:PORT/v1 ...')."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not lines and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not lines or not lines[0].startswith("serving "):
        raise SystemExit(f"the server did not become ready within {timeout_s:.0f} s (exit code {proc.poll()})")
    return lines[0].split(" at ")[1].split("/v1")[0]


def machine() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    return f"{platform.node()}: {os.cpu_count()} CPUs"


def main() -> int:
    argv = sys.argv[1:]
    server_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-chars", type=int, default=128)
    p.add_argument("--duration-s", type=float, default=300.0)
    p.add_argument("--start-timeout", type=float, default=300.0)
    args = p.parse_args(own)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    load_start = os.getloadavg()[0]
    server_cmd = [sys.executable, "-m", "launch", "serve", "--port", "0", *server_flags]
    with tempfile.TemporaryFile("w+") as server_log:
        server = subprocess.Popen(server_cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=server_log, text=True)
        try:
            url = ready_url(server, args.start_timeout)
            bench = [sys.executable, "-m", "launch", "bench", "serve", "--url", url, "--concurrency", args.concurrency,
                     "--requests", str(args.requests), "--max-tokens", str(args.max_tokens),
                     "--prompt-chars", str(args.prompt_chars), "--duration-s", str(args.duration_s), "--out", args.out]
            levels = len(args.concurrency.split(","))
            rc = subprocess.run(bench, cwd=ROOT, env=env, timeout=levels * args.duration_s + 120).returncode
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=30)
            server_log.seek(0)
            log = server_log.read()
    if rc != 0:
        print(log[-3000:], file=sys.stderr)
        return rc
    report = json.loads(Path(args.out).read_text())
    report.update({"server_command": " ".join(server_cmd[1:]), "machine": machine(),
                   "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]}})  # a shared host skews
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({report['machine']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
