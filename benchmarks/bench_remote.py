"""Remote shards vs local ones: latent shards served over HTTP from loopback, read by the training stream.

    python benchmarks/bench_remote.py [--num 5000] [--batch-size 64] [--workers 0 2] [--reps 3] [--epochs 2]

The latent shards of benchmarks/bench_loader.py (built there if missing, in ``--work``) are served by nginx (or
Python's http.server when nginx is missing, ``--server python``) on 127.0.0.1 and read:

* local exact / local resampled: ``build_stream(DIR)``, the reference reader;
* HTTP resampled: ``build_stream("http://127.0.0.1:PORT/lat_shards", mode="resampled")``, shards streamed;
* HTTP exact, cold cache: the same spec in exact mode from an empty shard cache (every shard downloaded, verified,
  then read); warm cache: the same run again with the cache filled (no download).

Each timed run reads ``--epochs`` epochs the way a training loop does (one stream; start-up included); runs of
all readers alternate and the best of ``--reps`` counts (the CPU is shared). Reported: samples per wall second,
samples per CPU second of this process and its children (DataLoader workers, download commands) and the server's
CPU per sample (nginx: its worker process).
"""
from __future__ import annotations

import argparse
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil

from bench_loader import cpu_seconds, setup
from data_pipeline.loader import build_stream


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, kind: str, scratch: Path) -> Tuple[subprocess.Popen, int]:
    """nginx (or ``python -m http.server``) serving ``root`` on a free loopback port; returns (process, port)."""
    port = free_port()
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if kind == "nginx" and nginx:
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        conf = scratch / "nginx.conf"
        conf.write_text(f"""daemon off; worker_processes 1; {user} pid {scratch}/nginx.pid;
error_log {scratch}/error.log warn; events {{ worker_connections 256; }}
http {{ access_log off; sendfile on; client_body_temp_path {scratch}/body;
  server {{ listen 127.0.0.1:{port}; root {root}; }} }}
""")
        proc = subprocess.Popen([nginx, "-p", str(scratch), "-c", str(conf), "-e", str(scratch / "error.log")])
    else:
        proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                 "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the {kind} server did not start on port {port}")


def server_cpu(proc: subprocess.Popen) -> float:
    """CPU seconds of the server and its worker processes so far."""
    total = 0.0
    try:
        p = psutil.Process(proc.pid)
        for q in [p] + p.children(recursive=True):
            t = q.cpu_times()
            total += t.user + t.system
    except psutil.Error:
        pass
    return total


def time_stream(spec: str, mode: str, batch: int, workers: int, epochs: int, cache: Optional[str],
                server: subprocess.Popen) -> Tuple[float, float, float, int]:
    """(wall s, client CPU s, server CPU s, samples) for ``epochs`` epochs of one stream."""
    s0, c0, t0 = server_cpu(server), cpu_seconds(), time.perf_counter()
    stream = build_stream(spec, batch_size=batch, num_workers=workers, seed=0, mode=mode, cache_dir=cache)
    it = iter(stream)
    n = epochs * stream.batches_per_epoch
    for _ in range(n):
        next(it)
    wall = time.perf_counter() - t0
    stream.close()
    assert stream.corrupt_count == 0 and not stream.bad_shards, (stream.corrupt_count, stream.bad_shards)
    return wall, cpu_seconds() - c0, server_cpu(server) - s0, n * batch


def measure(kind: str, local: str, url: str, args: argparse.Namespace, cache: Path,
            server: subprocess.Popen) -> List[tuple]:
    """The table rows of one data set: every reader with every worker count."""
    b, e = args.batch_size, args.epochs
    rows: List[tuple] = []
    for nw in args.workers:
        def cold() -> Tuple[float, float, float, int]:
            shutil.rmtree(cache, ignore_errors=True)
            return time_stream(url, "exact", b, nw, e, str(cache), server)

        runs: Dict[str, Callable[[], Tuple[float, float, float, int]]] = {
            "local exact": lambda: time_stream(local, "exact", b, nw, e, None, server),
            "local resampled": lambda: time_stream(local, "resampled", b, nw, e, None, server),
            "HTTP resampled (streamed)": lambda: time_stream(url, "resampled", b, nw, e, None, server),
            "HTTP exact, cold cache": cold,
            "HTTP exact, warm cache": lambda: time_stream(url, "exact", b, nw, e, str(cache), server),
        }
        for run in runs.values():  # warm-up (page cache, imports)
            run()
        best = {k: (0.0, 0.0, float("inf")) for k in runs}
        for _ in range(args.reps):  # interleaved, so changes in machine load hit all readers
            for k, run in runs.items():
                wall, cpu, srv, n = run()
                rate, per_cpu, srv_us = n / wall, n / cpu, 1e6 * srv / n
                best[k] = (max(best[k][0], rate), max(best[k][1], per_cpu), min(best[k][2], srv_us))
        for k, (rate, per_cpu, srv_us) in best.items():
            base = best["local exact" if "exact" in k else "local resampled"]
            rows.append((kind, k, nw, rate, rate / base[0], per_cpu, per_cpu / base[1], srv_us))
            print(f"{kind} {k} workers={nw}: {rate:.0f}/s, {per_cpu:.0f}/CPU-s", flush=True)
    return rows


def main(argv: List[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/bench_loader", help="where the data sets are built (reused)")
    p.add_argument("--num", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    p.add_argument("--server", choices=("nginx", "python"), default="nginx")
    p.add_argument("--data", nargs="+", choices=("latents", "images"), default=["latents"])
    args = p.parse_args(argv)
    paths = setup(Path(args.work), args.num, 32, 64)
    scratch = Path(tempfile.mkdtemp(prefix="bench_remote_"))
    server, port = start_server(paths["lat_shards"].parent, args.server, scratch)
    rows = []
    try:
        for kind in args.data:
            local = paths["lat_shards" if kind == "latents" else "img_shards"]
            rows += measure(kind, str(local), f"http://127.0.0.1:{port}/{local.name}", args, scratch / "cache",
                            server)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{args.num} samples per data set (latents 4x32x32 mean+std fp16 with flipped twin; images 64 px PNG), "
          f"batch {args.batch_size}, {args.epochs} epochs per run, best of {args.reps} after a warm-up, server: "
          f"{args.server}\n")
    print("| data | reader | workers | samples/s | vs local | samples/CPU-s | vs local | CPU µs/sample "
          "| server CPU µs/sample |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, k, nw, rate, rel, per_cpu, rel_cpu, srv_us in rows:
        print(f"| {kind} | {k} | {nw} | {rate:.0f} | {rel:.2f} | {per_cpu:.0f} | {rel_cpu:.2f} "
              f"| {1e6 / per_cpu:.0f} | {srv_us:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
