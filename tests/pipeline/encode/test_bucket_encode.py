"""Aspect-ratio buckets end to end on the real photos (landscape, square, and the same photos turned upright for
portrait): each image goes to the bucket that crops it least, a part holds one bucket, training draws each batch
from one bucket (with micro-conditioning on the original size and crop), and sampling at a wide or a tall size
picks the trained bucket of that aspect."""
import dataclasses
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.data.buckets import buckets, cover
from pipeline.data.make_shards import photo_records, write_shards
from pipeline.data.preprocess import PreprocessConfig
from pipeline.encode.flow import EncodeOptions, run_encode
from pipeline.cache.reader import part_buckets, part_files, read_manifest


def mixed_photos(n=24):
    out = []
    for i, r in enumerate(photo_records("train", 0, "png")):
        if i == n:
            break
        im = Image.open(io.BytesIO(r.image)).convert("RGB")
        im.thumbnail((64, 64))
        if i % 2:  # every other photo turned upright: portrait shapes from real pixels
            im = im.transpose(Image.Transpose.ROTATE_90)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(dataclasses.replace(r, image=buf.getvalue(), width=im.width, height=im.height,
                                       source=f"{r.source}-{i}"))
    return out


def cropped(w, h, bucket):
    """The share of an image of w x h that covering `bucket` and cropping to it cuts away."""
    nw, nh = cover(w, h, bucket)
    return 1 - bucket[0] * bucket[1] / (nw * nh)


TRAIN = dict(preset="tiny", num_workers=2, batch_size=2, sample_every=0, max_failures=0,
             overrides=("conditioning.text_encoder=hf", "unet.context_dim=384", "conditioning.max_length=16",
                        "unet.micro_cond=true"))


@pytest.fixture(scope="module")
def photo_cache(ray_local, tiny_ae_ckpt, tmp_path_factory):
    """24 real photos (half turned upright) in aspect buckets, at 16 and 32 px in one pass, flipped latents kept."""
    root = tmp_path_factory.mktemp("photos")
    write_shards(iter(mixed_photos()), str(root / "shards"), "webdataset", 12, seed=0)
    pre = PreprocessConfig(resolution=16, bucket=True, bucket_step=4, extra_resolutions=(32,), flip_latents=True)
    s = run_encode(EncodeOptions(input=str(root / "shards"), output=str(root / "lat"), autoencoder=tiny_ae_ckpt,
                                 preprocess=pre, max_length=16, batch_size=8))
    return str(root / "lat"), s, pre


def test_bucketed_cache_trains_and_samples_at_its_aspects(photo_cache, tmp_path):
    from pipeline.evaluate.sample import sample_images
    from pipeline.train.ldm_driver import run_train
    from pipeline.train.options import TrainOptions
    cache, s, pre = photo_cache
    m = read_manifest(cache)
    options = [tuple(b) for b in m["buckets"]]
    assert options == buckets(16, 4, pre.max_aspect) and s["kept"] == 24
    assert len(s["buckets"]) >= 3 and sum(s["buckets"].values()) == 24, s["buckets"]  # tall, square and wide
    assert s["resolutions"]["16"] == 24 and 0 < s["resolutions"]["32"] <= 24  # photos smaller than 32 px left out
    sizes = part_buckets(m)
    for f, (bh, bw) in zip(part_files(cache, m), sizes):
        t = pq.read_table(f)
        assert set(t["bucket_h"].to_pylist()) == {bh} and set(t["bucket_w"].to_pylist()) == {bw}  # one per part
        assert {len(v) for v in t["latent_mean"].to_pylist()} == {4 * bh // 2 * bw // 2}
        assert {len(v) for v in t["latent_mean_32"].to_pylist()} <= {0, 4 * bh * bw}  # the same crop at 2x
        for w, h in zip(t["orig_w"].to_pylist(), t["orig_h"].to_pylist()):  # no image cropped beyond its bucket's
            assert cropped(w, h, (bh, bw)) <= min(cropped(w, h, b) for b in options) + 1e-9  # rounding
    lines = []
    r = run_train(TrainOptions(latents=cache, max_steps=6, checkpoint_every=6, storage_path=str(tmp_path / "runs"),
                               name="bucketed", **TRAIN), log=lines.append)
    assert r["step"] == 6 and np.isfinite(r["loss"])
    assert any("aspect buckets (rows)" in x and "a batch from one bucket" in x for x in lines), lines
    trained = sorted(s["buckets"], key=lambda k: int(k.split("x")[1]) / int(k.split("x")[0]))
    tall, wide = (tuple(int(v) for v in trained[i].split("x")) for i in (0, -1))
    for ask, want in (((40, 8), tall), ((8, 40), wide)):
        im, _ = sample_images(r["export"], ["a photo"], 1, steps=2, size=ask, orig_size=(64, 48))
        assert tuple(im.shape[-2:]) == want


def tensors(obj):
    """The tensors of a (nested) checkpoint object, flattened by path."""
    if isinstance(obj, torch.Tensor):
        return {"": obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {f"{k}/{p}": t for k, v in items for p, t in tensors(v).items()}


def test_a_16_to_32_px_curriculum_carries_optimizer_and_ema_over(photo_cache, tmp_path):
    """--resume-from a 16 px run at --resolution 32: the new phase starts from exactly the first's optimizer and EMA
    state and step, restarts the data position, is filed under the first's MLflow run, and trains at 32 px."""
    import glob

    import mlflow

    from pipeline.train.ldm_driver import run_train
    from pipeline.train.options import TrainOptions
    cache = photo_cache[0]
    uri = f"sqlite:///{tmp_path}/m.db"
    common = dict(latents=cache, storage_path=str(tmp_path / "runs"), mlflow_uri=uri, checkpoint_every=100, **TRAIN)
    first = run_train(TrainOptions(max_steps=4, name="p16", **common))
    lines = []
    held = run_train(TrainOptions(max_steps=4, name="p32", resolution=32, resume_from=first["run_dir"], **common),
                     log=lines.append)  # at step 4 already: nothing trained, the state checkpointed as loaded
    assert held["step"] == 4 and any("a new phase from" in x for x in lines)
    for name in ("ema.pt", "ds/*optim_states.pt"):
        pairs = list(zip(sorted(glob.glob(f"{first['checkpoint']}/{name}")),
                         sorted(glob.glob(f"{held['checkpoint']}/{name}"))))
        assert pairs
        for a, b in pairs:
            ta, tb = tensors(torch.load(a, weights_only=False)), tensors(torch.load(b, weights_only=False))
            assert ta.keys() == tb.keys() and len(ta) > 2
            assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    on = run_train(TrainOptions(max_steps=8, name="p32", resolution=32, resume_from=first["run_dir"], **common))
    assert on["step"] == 8 and on["mlflow_run_id"] == held["mlflow_run_id"] != first["mlflow_run_id"]
    run = mlflow.MlflowClient(uri).get_run(on["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == first["mlflow_run_id"] and run.data.params["resolution"] == "32"
    from ldm.checkpoint import load_components
    _, _, meta = load_components(on["export"])
    assert json.loads(meta["latent_shape"]) == [4, 16, 16]  # 32 px through the f=2 first stage
