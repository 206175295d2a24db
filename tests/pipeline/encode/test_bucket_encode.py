"""Aspect-ratio buckets end to end on the real photos (landscape, square, and the same photos turned upright for
portrait): each image goes to the bucket that crops it least, a part holds one bucket, training draws each batch
from one bucket (with micro-conditioning on the original size and crop), and sampling at a wide or a tall size
picks the trained bucket of that aspect."""
import dataclasses
import io

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipeline.data.buckets import buckets, cover
from pipeline.data.make_shards import photo_records, write_shards
from pipeline.data.preprocess import PreprocessConfig
from pipeline.encode.flow import EncodeOptions, run_encode
from pipeline.encode.latent_cache import part_buckets, part_files, read_manifest


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


def test_bucketed_cache_trains_and_samples_at_its_aspects(ray_local, tiny_ae_ckpt, tmp_path):
    from pipeline.evaluate.sample import sample_images
    from pipeline.train.ldm import run_train
    from pipeline.train.options import TrainOptions
    write_shards(iter(mixed_photos()), str(tmp_path / "shards"), "webdataset", 12, seed=0)
    pre = PreprocessConfig(resolution=16, bucket=True, bucket_step=4)
    s = run_encode(EncodeOptions(input=str(tmp_path / "shards"), output=str(tmp_path / "lat"), autoencoder=tiny_ae_ckpt,
                                 preprocess=pre, max_length=16, batch_size=8))
    m = read_manifest(str(tmp_path / "lat"))
    options = [tuple(b) for b in m["buckets"]]
    assert options == buckets(16, 4, pre.max_aspect) and s["kept"] == 24
    assert len(s["buckets"]) >= 3 and sum(s["buckets"].values()) == 24, s["buckets"]  # tall, square and wide
    sizes = part_buckets(m)
    for f, (bh, bw) in zip(part_files(str(tmp_path / "lat"), m), sizes):
        t = pq.read_table(f)
        assert set(t["bucket_h"].to_pylist()) == {bh} and set(t["bucket_w"].to_pylist()) == {bw}  # one per part
        assert {len(v) for v in t["latent_mean"].to_pylist()} == {4 * bh // 2 * bw // 2}
        for w, h in zip(t["orig_w"].to_pylist(), t["orig_h"].to_pylist()):  # no image cropped beyond its bucket's
            assert cropped(w, h, (bh, bw)) <= min(cropped(w, h, b) for b in options) + 1e-9  # rounding
    lines = []
    train = TrainOptions(latents=str(tmp_path / "lat"), preset="tiny", num_workers=2, max_steps=6, batch_size=2,
                         checkpoint_every=6, sample_every=0, storage_path=str(tmp_path / "runs"), name="bucketed",
                         overrides=("conditioning.text_encoder=hf", "unet.context_dim=384",
                                    "conditioning.max_length=16", "unet.micro_cond=true"))
    r = run_train(train, log=lines.append)
    assert r["step"] == 6 and np.isfinite(r["loss"])
    assert any("aspect buckets (rows)" in x and "a batch from one bucket" in x for x in lines), lines
    trained = sorted(s["buckets"], key=lambda k: int(k.split("x")[1]) / int(k.split("x")[0]))
    tall, wide = (tuple(int(v) for v in trained[i].split("x")) for i in (0, -1))
    for ask, want in (((40, 8), tall), ((8, 40), wide)):
        im, _ = sample_images(r["export"], ["a photo"], 1, steps=2, size=ask, orig_size=(64, 48))
        assert tuple(im.shape[-2:]) == want
