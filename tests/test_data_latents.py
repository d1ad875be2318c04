"""encode_latents on 2 ranks (subprocesses) and the latent loader: twins, statistics, normalisation, resume."""
import io
import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.loader import build_stream
from data_pipeline.synthetic import write_image_shards, write_latent_shards

ROOT = Path(__file__).resolve().parent.parent

# A small fixed "VAE": random 2x2 stride-2 convolutions (C=1 -> 4 channels), identical in every process.
ENCODER = textwrap.dedent("""
    import torch

    def make_encode_fn():
        g = torch.Generator().manual_seed(1234)
        w_mean = torch.randn(4, 1, 2, 2, generator=g)
        w_std = torch.randn(4, 1, 2, 2, generator=g) * 0.1

        def encode(x):
            mean = torch.nn.functional.conv2d(x, w_mean, stride=2) + torch.arange(4.0).view(1, 4, 1, 1)
            std = torch.nn.functional.softplus(torch.nn.functional.conv2d(x, w_std, stride=2)) * 0.2 + 0.01
            return mean, std
        return encode
""")

RANK_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from encoder import make_encode_fn
    from data_pipeline.encode_latents import encode_shards
    rank, world = int(sys.argv[2]), int(sys.argv[3])
    for stored in ("mean_std", "sample"):
        encode_shards(make_encode_fn(), sys.argv[4], sys.argv[5] + "/" + stored, rank=rank, world_size=world,
                      batch_size=8, vae_name="fixed-conv", stored=stored)
""")


def load_members(path):
    """{key: {ext: bytes}} of a tar."""
    out = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    base = tmp_path_factory.mktemp("lat")
    (base / "encoder.py").write_text(ENCODER)
    (base / "rank.py").write_text(RANK_SCRIPT)
    write_image_shards(base / "img", [20, 20, 13], image_size=8)  # 3 input shards over 2 ranks
    procs = [subprocess.Popen([sys.executable, str(base / "rank.py"), str(base), str(r), "2", str(base / "img"),
                               str(base)], cwd=ROOT, stderr=subprocess.PIPE) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    out = {stored: base / stored for stored in ("mean_std", "sample")}
    sys.path.insert(0, str(base))
    from encoder import make_encode_fn  # noqa: E402

    sys.path.pop(0)
    return base, out, make_encode_fn()


@pytest.mark.slow
def test_two_rank_encode_outputs_and_manifest(encoded):
    base, out, encode = encoded
    m = json.loads((out["mean_std"] / "manifest.json").read_text())
    assert m["kind"] == "latent" and m["total"] == 53
    assert [s["name"] for s in m["shards"]] == [f"train-{i:06d}.tar" for i in range(3)]
    assert [s["num_samples"] for s in m["shards"]] == [20, 20, 13]
    lat = m["latent"]
    assert lat["shape"] == [4, 4, 4] and lat["vae"] == "fixed-conv" and lat["stored"] == "mean_std"
    assert not list(out["mean_std"].glob(".partial-*"))
    keys, first, second, n = [], np.zeros(4), np.zeros(4), 0
    for s in m["shards"]:
        members = load_members(out["mean_std"] / s["name"])
        imgs = load_members(base / "img" / s["name"])
        assert list(members) == list(imgs)  # same keys, same order, each sample once
        keys += list(members)
        for key, mem in members.items():
            arr = np.load(io.BytesIO(mem["npy"]))
            assert arr.shape == (2, 2, 4, 4, 4) and arr.dtype == np.float16
            assert mem["cls"] == imgs[key]["cls"]
            from PIL import Image
            img = np.asarray(Image.open(io.BytesIO(imgs[key]["png"])), dtype=np.float32)
            x = torch.from_numpy(img / 127.5 - 1.0)[None, None]
            for twin, xi in enumerate((x, torch.flip(x, dims=[3]))):  # the flipped twin is the flip's posterior
                mean, std = encode(xi)
                np.testing.assert_allclose(arr[twin, 0], mean[0].numpy(), rtol=2e-3, atol=2e-3)
                np.testing.assert_allclose(arr[twin, 1], std[0].numpy(), rtol=2e-3, atol=1e-4)
            a = arr.astype(np.float64)
            first += a[:, 0].sum(axis=(0, 2, 3))
            second += (a[:, 0] ** 2 + a[:, 1] ** 2).sum(axis=(0, 2, 3))
            n += 2 * 16
    assert len(set(keys)) == 53
    mean = first / n
    std = np.sqrt(second / n - mean ** 2)
    np.testing.assert_allclose(lat["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(lat["std"], std, rtol=1e-9)
    np.testing.assert_allclose(lat["shift"], mean, rtol=1e-9)
    np.testing.assert_allclose(lat["scale"], 1 / std, rtol=1e-9)


@pytest.mark.slow
def test_sample_mode_and_normalised_loader(encoded):
    base, out, _ = encoded
    m = json.loads((out["sample"] / "manifest.json").read_text())
    assert m["latent"]["stored"] == "sample" and m["total"] == 53
    stored = {}
    for s in m["shards"]:
        for key, mem in load_members(out["sample"] / s["name"]).items():
            stored[key] = np.load(io.BytesIO(mem["npy"])).astype(np.float64)
    shift = np.asarray(m["latent"]["shift"]).reshape(4, 1, 1)
    scale = np.asarray(m["latent"]["scale"]).reshape(4, 1, 1)
    s = build_stream(out["sample"], batch_size=53, num_workers=0, seed=0)
    x, _ = next(iter(s))
    # every loaded latent is exactly one stored twin, normalised with the manifest's shift/scale
    refs = {k: [(v[t] - shift) * scale for t in range(2)] for k, v in stored.items()}
    matched = set()
    for xi in x.numpy().astype(np.float64):
        hits = [(k, t) for k, r in refs.items() for t in range(2) if np.allclose(xi, r[t], rtol=1e-5, atol=1e-5)]
        assert len(hits) == 1
        matched.add(hits[0][0])
    assert len(matched) == 53
    assert abs(x.mean().item()) < 0.2 and 0.8 < x.std().item() < 1.2  # normalised to ~N(0, 1) per channel


def test_mean_std_loader_draws_fresh_posterior_noise_and_resumes(tmp_path):
    write_latent_shards(tmp_path, [9, 7], shape=(2, 3, 3), latent_std=0.5, shift=[1.0, -1.0], scale=[0.5, 2.0])
    kw = dict(batch_size=4, num_workers=0, seed=11)
    full = []
    it = iter(build_stream(tmp_path, **kw))
    full = [next(it) for _ in range(12)]  # 3 epochs of 4 batches
    x = torch.cat([b[0] for b in full]).double()
    z = x / torch.tensor([0.5, 2.0]).view(1, 2, 1, 1).double() + torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
    centre = z.mean(dim=(1, 2, 3)).round()  # sample i has mean +i (image) or -i (flipped twin)
    eps = (z - centre.view(-1, 1, 1, 1)) / 0.5
    assert abs(eps.mean().item()) < 0.1 and abs(eps.std().item() - 1.0) < 0.1  # z = mean + std * N(0, 1)
    assert (centre < 0).any() and (centre > 0).any()  # both twins are used
    first_epoch = centre[:16].abs().tolist()
    assert sorted(first_epoch) == list(range(16))
    # the same sample in another epoch gets different noise
    ep0 = {abs(c): e for c, e in zip(centre[:16].tolist(), eps[:16])}
    ep1 = {abs(c): e for c, e in zip(centre[16:32].tolist(), eps[16:32])}
    assert not torch.allclose(ep0[3.0], ep1[3.0])
    s = build_stream(tmp_path, **kw)
    it = iter(s)
    for _ in range(5):
        next(it)
    resumed = build_stream(tmp_path, position=json.loads(json.dumps(s.position())), num_workers=2,
                           **{k: v for k, v in kw.items() if k != "num_workers"})
    it2 = iter(resumed)
    for k in range(5, 12):
        a = next(it2)
        assert torch.equal(a[0], full[k][0]) and torch.equal(a[1], full[k][1])
    resumed.close()


@pytest.mark.slow
def test_encode_latents_cli_with_project_vae(tmp_path):
    vae_io = pytest.importorskip("data_pipeline.vae_io")
    from dit.vae import AutoencoderKL

    try:
        model = AutoencoderKL(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, z_channels=4,
                              num_groups=4)
    except TypeError:
        pytest.skip("AutoencoderKL constructor differs from what this test assumes")
    vae_path = vae_io.save_vae(tmp_path / "vae.safetensors", model, image_size=8)
    write_image_shards(tmp_path / "img", [6, 5], image_size=8)
    env = dict(__import__("os").environ, RANK="0", WORLD_SIZE="1")
    r = subprocess.run([sys.executable, str(ROOT / "data_pipeline" / "encode_latents.py"), "--vae", str(vae_path),
                        "--shards", str(tmp_path / "img"), "--out", str(tmp_path / "lat"), "--batch-size", "4",
                        "--scale-factor", "0.18215"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "lat" / "manifest.json").read_text())
    assert m["total"] == 11 and m["latent"]["shift"] == [0.0] * 4 and m["latent"]["scale"] == [0.18215] * 4
    assert m["latent"]["vae"].endswith("vae.safetensors")


def test_non_finite_latent_is_skipped_and_counted(tmp_path):
    write_latent_shards(tmp_path, [8], shape=(1, 2, 2), stored="sample")
    path = tmp_path / "train-000000.tar"
    data = bytearray(path.read_bytes())
    member = data.index(b"000000003.npy")  # header block of sample 3; its .npy starts at the next block
    npy = member + 512
    hlen = int.from_bytes(data[npy + 8:npy + 10], "little")
    data[npy + 10 + hlen:npy + 12 + hlen] = np.array([np.nan], dtype=np.float16).tobytes()
    path.write_bytes(bytes(data))
    s = build_stream(tmp_path, batch_size=4, num_workers=0, flip=False)
    it = iter(s)
    x = torch.cat([next(it)[0] for _ in range(2)])
    assert torch.isfinite(x).all() and s.corrupt_count == 1
    assert sorted(set(x[:, 0, 1, 1].round().long().tolist())) == [0, 1, 2, 4, 5, 6, 7]
