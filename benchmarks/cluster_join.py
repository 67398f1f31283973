"""Step time of `dgx-emu generate` started locally vs joined to a one-host cluster (`--ray-address auto`).

The acceptance of issue #19: joining a cluster behaves like a local start, with the same output
and a step time within 20%. The script starts `ray start --head --num-cpus N --block` under a
private RAY_TMPDIR (so `auto` finds this cluster and nothing else on the machine does), then
alternates local and joined runs of the same command (the idle cluster runs during both, so both
see the same machine), and one joined run with the old workaround `--comm gloo`. It reports the
median over runs of each run's median decode step, checks that every run printed the same tokens,
stops the cluster and saves benchmarks/results/cluster_join_cpu.json.

    python benchmarks/cluster_join.py [--repeats 3] [--world-size 8] [--max-new-tokens 32]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, median, print_table, save  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(tmp: str, cpus: int, env: dict, attempts: int = 3, gpus: int | None = None) -> subprocess.Popen:
    """`ray start --head --block` under RAY_TMPDIR=tmp; on a loaded host the raylet can miss Ray's
    fixed start-up window, so a head that exits before writing its address is started again."""
    for attempt in range(1, attempts + 1):
        gpu_flags = ["--num-gpus", str(gpus)] if gpus is not None else []
        head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",  # `ray`
                                 "--num-cpus", str(cpus), "--port", str(_free_port()), "--temp-dir", tmp,
                                 "--include-dashboard=false", "--disable-usage-stats", *gpu_flags],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 180
        while not (Path(tmp) / "ray_current_cluster").is_file():
            if head.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        else:
            return head
        stop_head(head)
    raise RuntimeError(f"ray start --head did not come up ({attempts} attempts)")


def stop_head(head: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` (its reaper takes the raylet, the GCS and the workers down),
    then SIGKILL to whatever of its process group is left (it was started in a session of its own)."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait(timeout=10)
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _generate(argv: list[str], env: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "launch", "generate", *argv, "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"generate {' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--cluster-cpus", type=int, default=8)
    args = p.parse_args()
    common = ["--prompt", "def fibonacci(n):", "--max-new-tokens", str(args.max_new_tokens), "--ignore-eos",
              "--world-size", str(args.world_size)]
    tmp = tempfile.mkdtemp(prefix="cj", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    runs: dict[str, list[dict]] = {"local": [], "--ray-address auto": [], "--ray-address auto --comm gloo": []}
    head = start_head(tmp, args.cluster_cpus, env)
    try:
        for _ in range(args.repeats):
            runs["local"].append(_generate(common, env))
            runs["--ray-address auto"].append(_generate(common + ["--ray-address", "auto"], env))
        runs["--ray-address auto --comm gloo"].append(_generate(common + ["--ray-address", "auto", "--comm", "gloo"], env))
    finally:
        stop_head(head)
        shutil.rmtree(tmp, ignore_errors=True)
    reference = runs["local"][0]["token_ids"]
    rows, report = [], {"machine": machine(), "argv": common, "modes": {}}
    for mode, results in runs.items():
        steps = [r["step_latency_s"]["p50"] for r in results]
        same = all(r["token_ids"] == reference for r in results)
        rows.append([mode, len(results), median(steps) * 1e3, ", ".join(f"{s * 1e3:.1f}" for s in steps),
                     results[0]["placement"]["data_plane"] if "placement" in results[0] else "-", same])
        report["modes"][mode] = {"step_p50_s": steps, "same_tokens": same,
                                 "placement": results[0].get("placement")}
    ratio = median(report["modes"]["--ray-address auto"]["step_p50_s"]) / median(report["modes"]["local"]["step_p50_s"])
    report["joined_over_local"] = ratio
    print_table(["mode", "runs", "step p50 ms (median)", "per run", "data plane", "same tokens"], rows)
    print(f"joined / local step time: {ratio:.3f} (acceptance: <= 1.20); machine: {report['machine']}")
    print(f"saved {save('cluster_join_cpu', report)}")


if __name__ == "__main__":
    main()
