"""eval/fid.py on several ranks: the sample set does not depend on the world size; interrupted runs resume."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, entry_env, run_entry
from tests.test_inference import PIXEL_KW, tiny_checkpoint

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(ckpt, out, n):
    return ["eval/fid.py", "--ckpt", str(ckpt), "--num-samples", str(n), "--batch-size", "2", "--steps", "3",
            "--metrics", "none", "--save-npz", "--out", str(out), "--cfg-scale", "1.5", "--seed", "11"]


def test_world_size_does_not_change_the_samples_and_resume_skips_done_work(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors", dict(PIXEL_KW, depth=1))
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_entry(_args(ckpt, one, 7))
    assert proc.returncode == 0, proc.stderr[-3000:]

    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, *_args(ckpt, two, 7)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=entry_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    a, b = np.load(one / "samples.npz"), np.load(two / "samples.npz")
    assert a["arr_0"].shape == (7, 8, 8, 1)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert a["arr_1"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert len({a["arr_0"][i].tobytes() for i in range(7)}) == 7  # every sample is its own
    # every part file belongs to one rank: its indices are congruent modulo the world size
    parts = sorted((two / "parts").glob("part_*.npz"))
    assert len(parts) == 4  # rank 0: {0,2},{4,6}; rank 1: {1,3},{5}
    for p in parts:
        idx = np.load(p)["index"]
        assert len(set(idx % 2)) == 1
    rec = json.loads((two / "metrics.json").read_text())
    assert rec["world_size"] == 2 and [t["generated"] for t in rec["timing"]["per_rank"]] == [4, 3]

    # resume: a larger N in the same directory only generates the new samples, the old ones are kept as they are
    mtimes = {p.name: p.stat().st_mtime_ns for p in (one / "parts").glob("part_*.npz")}
    proc = run_entry(_args(ckpt, one, 9))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((one / "metrics.json").read_text())
    assert rec["timing"]["per_rank"][0]["generated"] == 2
    assert all((one / "parts" / n).stat().st_mtime_ns == t for n, t in mtimes.items())
    c = np.load(one / "samples.npz")
    assert c["arr_0"].shape[0] == 9 and np.array_equal(c["arr_0"][:7], a["arr_0"])
