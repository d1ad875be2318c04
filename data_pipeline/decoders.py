"""Sample decoders of the training stream: one sample's members → a row of a batch array → the batch tensor.

A sample is read either from a local shard at known offsets (:class:`ShardReader`, the exact reader) or from the
member bytes a streamed tar yields (``{"npy": b"...", "cls": b"3"}``, remote resampled mode); both give the same
row. ``finish`` turns a filled batch into the float32 tensor the trainer gets (images scaled to [-1, 1]; latents
``(z - shift) * scale``, z a fresh posterior sample for ``mean_std`` latents). Latent shards written with
``encode_latents.py --keep-images`` can also give each latent's source image (:class:`LatentImageDecoder`).
"""
from __future__ import annotations

import ast
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

from data_pipeline.imaging import IMAGE_EXTS, decode_to_array
from data_pipeline.manifest import ManifestError
from data_pipeline.tario import ShardReader

Members = Dict[str, Tuple[int, int]]


class NoReadableSamplesError(RuntimeError):
    """Every sample a rank tried to read was corrupt: one line naming the rank, the first shards and their count.

    ``shards``: every shard of the rank's epoch (file names); ``rank``, ``epoch``: where it happened.
    """

    def __init__(self, message: str, shards: Sequence[str] = (), rank: int = 0, epoch: int = 0):
        super().__init__(message)  # args = (message,): pickles through DataLoader workers with the attributes
        self.shards: List[str] = list(shards)
        self.rank, self.epoch = rank, epoch


def npy_header(head: bytes) -> Tuple[int, np.dtype, Tuple[int, ...]]:
    """(data offset, dtype, shape) of the .npy file starting with ``head``; raises ValueError if malformed."""
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy member")
    if head[6] == 1:
        hlen, start = int.from_bytes(head[8:10], "little"), 10
    else:
        hlen, start = int.from_bytes(head[8:12], "little"), 12
    if start + hlen > len(head):
        raise ValueError("truncated .npy header")
    d = ast.literal_eval(head[start:start + hlen].decode("latin1"))
    if not isinstance(d, dict) or d.get("fortran_order"):
        raise ValueError("unsupported .npy header")
    return start + hlen, np.dtype(d["descr"]), tuple(d["shape"])


def output_tensor(shape: Tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 batch; in a DataLoader worker it is allocated in shared memory (as default_collate
    does), so sending it to the main process costs no copy."""
    out = torch.empty(shape, dtype=torch.float32)
    if get_worker_info() is not None:
        out.share_memory_()
    return out


def replace_corrupt(out: np.ndarray, labels: np.ndarray, good: List[int]) -> None:
    """Fill the rows of a batch not in ``good`` (corrupt samples) with copies of the good ones, in turn."""
    good_set = set(good)
    for n, i in enumerate(k for k in range(len(out)) if k not in good_set):
        src = good[n % len(good)]
        out[i] = out[src]
        labels[i] = labels[src]


class Decoder:
    """Reads one sample (payload + label) into a row of a batch; subclasses assemble batches."""

    def __init__(self, manifest: Dict[str, Any]):
        self.num_classes = len(manifest["class_names"])

    def label_of(self, raw: Optional[bytes]) -> int:
        """The label in a ``.cls`` member (None: no such member; 0 for unconditional data)."""
        if raw is None:
            if self.num_classes == 0:
                return 0
            raise ValueError("missing .cls member")
        y = int(raw)
        if self.num_classes and not 0 <= y < self.num_classes:
            raise ValueError(f"label {y} outside [0, {self.num_classes})")
        return y if self.num_classes else 0

    def label(self, reader: ShardReader, members: Members, shard: int) -> int:
        """The label of a sample of a local shard."""
        loc = members.get("cls")
        return self.label_of(None if loc is None else reader.read(shard, loc[0], loc[1]))

    def invalid_rows(self, batch: np.ndarray) -> np.ndarray:
        """Rows of a filled batch that must be treated as corrupt (none by default)."""
        return np.zeros(len(batch), dtype=bool)


class ImageDecoder(Decoder):
    """Image shards: PNG/JPEG members → uint8 rows → [-1, 1] float batches."""

    def __init__(self, manifest: Dict[str, Any]):
        super().__init__(manifest)
        self.size = int(manifest["image_size"])
        self.channels = int(manifest["channels"])
        first = manifest.get("image_format", "png")
        self.exts = (first,) + tuple(e for e in IMAGE_EXTS if e != first)

    def new_batch(self, n: int) -> np.ndarray:
        """An uninitialised uint8 batch of ``n`` images."""
        return np.empty((n, self.size, self.size, self.channels), dtype=np.uint8)

    def _put(self, data: bytes, flip: bool, out: np.ndarray, i: int) -> None:
        arr = decode_to_array(data, self.channels, self.size)
        out[i] = arr[:, ::-1] if flip else arr

    def read(self, reader: ShardReader, shard: int, members: Members, flip: bool, out: np.ndarray, i: int) -> None:
        """Decode the image of a sample of a local shard into ``out[i]``."""
        loc = next((members[e] for e in self.exts if e in members), None)
        if loc is None:
            raise ValueError("no image member")
        self._put(reader.read(shard, loc[0], loc[1]), flip, out, i)

    def read_bytes(self, sample: Mapping[str, bytes], flip: bool, out: np.ndarray, i: int) -> None:
        """Decode the image of a streamed sample (extension → member bytes) into ``out[i]``."""
        data = next((sample[e] for e in self.exts if e in sample), None)
        if data is None:
            raise ValueError("no image member")
        self._put(data, flip, out, i)

    def finish(self, batch: np.ndarray, noise_seed: int) -> torch.Tensor:
        """The float32 [B, C, H, W] batch in [-1, 1]."""
        # numpy, not torch: small tensor ops through torch's thread pool cost milliseconds on a busy CPU
        n, h, w, c = batch.shape
        out = output_tensor((n, c, h, w))
        x = out.numpy()
        np.divide(batch.transpose(0, 3, 1, 2), np.float32(127.5), out=x, dtype=np.float32)
        x -= np.float32(1.0)
        return out


class LatentDecoder(Decoder):
    """Latent shards: one .npy member per sample holding both twins (image, hflip) → normalised latents."""

    def __init__(self, manifest: Dict[str, Any]):
        super().__init__(manifest)
        lat = manifest["latent"]
        self.shape = tuple(int(s) for s in lat["shape"])
        self.stored = lat["stored"]
        if self.stored not in ("mean_std", "sample"):
            raise ManifestError(f"latent.stored must be 'mean_std' or 'sample', got {self.stored!r}")
        # per sample: [2 twins (image, hflip), 2 (mean, std), C, H, W] or [2 twins, C, H, W]
        self.sample_shape = (2, 2) + self.shape if self.stored == "mean_std" else (2,) + self.shape
        c = self.shape[0]
        self.shift = np.asarray(lat["shift"], dtype=np.float32).reshape(c, 1, 1)
        self.scale = np.asarray(lat["scale"], dtype=np.float32).reshape(c, 1, 1)
        self.dtype = np.dtype(lat.get("dtype", "float16"))
        self.twin_bytes = int(np.prod(self.sample_shape[1:])) * self.dtype.itemsize
        self._shard_header: Dict[int, Tuple[bytes, int]] = {}  # shard -> (header bytes, data offset)
        self._stream_header: Optional[Tuple[bytes, int]] = None  # the same for streamed samples

    def new_batch(self, n: int) -> np.ndarray:
        """An uninitialised batch of ``n`` stored twins."""
        return np.empty((n,) + self.sample_shape[1:], dtype=self.dtype)

    def _check(self, head: bytes, size: int) -> int:
        """The data offset of a latent member of ``size`` bytes starting with ``head``; ValueError if its dtype,
        shape or size differ from the manifest's."""
        data_off, dtype, shape = npy_header(head)
        if dtype != self.dtype or shape != self.sample_shape:
            raise ValueError(f"latent {dtype}{list(shape)}, the manifest says {self.dtype}{list(self.sample_shape)}")
        if size != data_off + 2 * self.twin_bytes:
            raise ValueError(f"latent member of {size} bytes, expected {data_off + 2 * self.twin_bytes}")
        return data_off

    def _header(self, reader: ShardReader, shard: int, off: int, size: int) -> Tuple[bytes, int]:
        data_off = self._check(reader.read(shard, off, min(size, 4096)), size)
        return reader.read(shard, off, data_off), data_off

    def read(self, reader: ShardReader, shard: int, members: Members, flip: bool, out: np.ndarray, i: int) -> None:
        """Copy the chosen twin of a sample of a local shard into ``out[i]`` (no intermediate copy)."""
        loc = members.get("npy")
        if loc is None:
            raise ValueError("no .npy member")
        off, size = loc
        known = self._shard_header.get(shard)
        if known is None:  # learn the shard's (identical) .npy header once, then only compare bytes
            if len(self._shard_header) > 4096:
                self._shard_header.clear()
            known = self._shard_header[shard] = self._header(reader, shard, off, size)
        header, data_off = known
        if size != data_off + 2 * self.twin_bytes or reader.read(shard, off, data_off) != header:
            _, data_off = self._header(reader, shard, off, size)  # an unusual but maybe valid header
        reader.read_into(shard, off + data_off + int(flip) * self.twin_bytes, memoryview(out[i]).cast("B"))

    def read_bytes(self, sample: Mapping[str, bytes], flip: bool, out: np.ndarray, i: int) -> None:
        """Copy the chosen twin of a streamed sample (extension → member bytes) into ``out[i]``."""
        data = sample.get("npy")
        if data is None:
            raise ValueError("no .npy member")
        known = self._stream_header
        if known is None or len(data) != known[1] + 2 * self.twin_bytes or not data.startswith(known[0]):
            data_off = self._check(data[:4096], len(data))
            known = self._stream_header = (data[:data_off], data_off)
        start = known[1] + int(flip) * self.twin_bytes
        memoryview(out[i]).cast("B")[:] = memoryview(data)[start:start + self.twin_bytes]

    def invalid_rows(self, batch: np.ndarray) -> np.ndarray:
        """Rows holding non-finite values."""
        flat = batch.reshape(len(batch), -1)
        if flat.dtype == np.float16:  # inf/nan <=> all exponent bits set; much faster than isfinite on fp16
            return ((flat.view(np.uint16) & 0x7C00) == 0x7C00).any(axis=1)
        return ~np.isfinite(flat).all(axis=1)

    def finish(self, batch: np.ndarray, noise_seed: int) -> torch.Tensor:
        """The normalised float32 [B, C, H, W] latents (posterior sampled with ``noise_seed`` for mean_std)."""
        out = output_tensor((batch.shape[0],) + self.shape)
        z = out.numpy()
        if self.stored == "mean_std":
            torch.randn(out.shape, generator=torch.Generator().manual_seed(noise_seed), out=out)
            z *= batch[:, 1]
            z += batch[:, 0]
        else:
            z[...] = batch
        z -= self.shift
        z *= self.scale
        return out


class LatentImageDecoder(LatentDecoder):
    """Latents and their source images (``encode_latents.py --keep-images``): a row holds the chosen twin and the
    image, flipped exactly when the flipped twin is chosen; ``finish`` gives (latents, uint8 images [B, C, H, W]).

    A batch is a numpy record array (fields ``lat`` and ``img``), so replacing a corrupt row copies both; an
    unreadable image makes its sample corrupt like an unreadable latent."""

    def __init__(self, manifest: Dict[str, Any]):
        super().__init__(manifest)
        images = manifest.get("images")
        if not isinstance(images, dict):
            raise ManifestError("the latent shards carry no source images (manifest key 'images'); re-encode them "
                                "with data_pipeline/encode_latents.py --keep-images")
        self.image = ImageDecoder(manifest)
        first = images.get("format", self.image.exts[0])
        self.image.exts = (first,) + tuple(e for e in self.image.exts if e != first)

    def new_batch(self, n: int) -> np.ndarray:
        """An uninitialised record batch of ``n`` (twin, image) rows."""
        img = self.image.new_batch(1)
        return np.empty(n, dtype=[("lat", self.dtype, self.sample_shape[1:]), ("img", img.dtype, img.shape[1:])])

    def read(self, reader: ShardReader, shard: int, members: Members, flip: bool, out: np.ndarray, i: int) -> None:
        """The chosen twin and the image (flipped with it) of a sample of a local shard into ``out[i]``."""
        super().read(reader, shard, members, flip, out["lat"], i)
        self.image.read(reader, shard, members, flip, out["img"], i)

    def read_bytes(self, sample: Mapping[str, bytes], flip: bool, out: np.ndarray, i: int) -> None:
        """The chosen twin and the image (flipped with it) of a streamed sample into ``out[i]``."""
        super().read_bytes(sample, flip, out["lat"], i)
        self.image.read_bytes(sample, flip, out["img"], i)

    def invalid_rows(self, batch: np.ndarray) -> np.ndarray:
        """Rows whose latents hold non-finite values."""
        return super().invalid_rows(batch["lat"])

    def finish(self, batch: np.ndarray, noise_seed: int) -> Tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """(the normalised float32 latents as `LatentDecoder.finish`, the uint8 images [B, C, H, W])."""
        x = super().finish(batch["lat"], noise_seed)
        n, h, w, c = batch["img"].shape
        images = torch.empty((n, c, h, w), dtype=torch.uint8)
        if get_worker_info() is not None:
            images.share_memory_()
        images.numpy()[...] = batch["img"].transpose(0, 3, 1, 2)
        return x, images


def make_decoder(manifest: Dict[str, Any], with_images: bool = False) -> Decoder:
    """The decoder of a manifest's kind; ``with_images``: latents with their source images (latent shards only)."""
    if manifest["kind"] == "image":
        return ImageDecoder(manifest)
    return LatentImageDecoder(manifest) if with_images else LatentDecoder(manifest)
