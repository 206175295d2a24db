"""Ray Data datasets built from img2dataset shards, shared by the encode job and stage-1 training:

  shard list -> read_shard (flat_map) -> preprocess_batch (decode, filter, resize/crop)
"""
from __future__ import annotations

import numpy as np

from pipeline.data.preprocess import PreprocessConfig, preprocess_batch
from pipeline.data.sources import discover_shards, read_shard


def preprocessed_records(shards: list[str], layout: str, pre: PreprocessConfig, cpus_per_task: float = 0.5,
                         batch_size: int = 64, dedup=None):
    """Every record of `shards`, good or bad (bad ones carry their `skip` reason), in preprocessed form; with
    `dedup` (a DedupIndex actor) duplicates of records kept before are skipped too."""
    import ray
    ds = ray.data.from_items([{"uri": u, "shard": i} for i, u in enumerate(shards)], override_num_blocks=len(shards))
    ds = ds.flat_map(read_shard, fn_kwargs={"layout": layout}, num_cpus=cpus_per_task)
    return ds.map_batches(preprocess_batch, fn_kwargs={"cfg": pre, "dedup": dedup}, batch_size=batch_size,
                          batch_format="numpy",
                          num_cpus=cpus_per_task)


def _good_images(batch: dict, resolution: int) -> dict:
    good = np.array([not s for s in batch["skip"]], dtype=bool)
    imgs = [np.frombuffer(b, np.uint8).reshape(resolution, resolution, 3) for b in batch["pixels"][good]]
    empty = np.zeros((0, resolution, resolution, 3), np.uint8)
    return {"image": np.stack(imgs) if imgs else empty, "key": np.array(batch["key"][good], dtype=object)}


def training_images(input_uri: str, pre: PreprocessConfig, cpus_per_task: float = 0.5):
    """Good images only, as uint8 (H, W, 3) arrays in an `image` column (stage-1 training and evaluation)."""
    shard_set = discover_shards(input_uri)
    ds = preprocessed_records(list(shard_set.shards), shard_set.layout, pre, cpus_per_task)
    return ds.map_batches(_good_images, fn_kwargs={"resolution": pre.resolution}, batch_format="numpy",
                          num_cpus=cpus_per_task)
