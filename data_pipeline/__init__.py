"""Data reaches training only as webdataset tar shards with a manifest.json beside them.

Modules: ``make_shards`` (MNIST / image folder / CelebA → image shards, several writer ranks), ``encode_latents``
(image shards → latent shards with the flipped twin, on every rank), ``loader`` (``build_stream``: the resumable,
rank- and worker-split training stream), ``order`` (the sample order as a pure function), ``tario`` (tar writer
and random-access reader), ``manifest`` (spec loading, atomic writes, partial-manifest merging), ``sources``,
``imaging``, ``dist_env``, ``synthetic`` (tiny shard sets for tests and benchmarks).
"""
