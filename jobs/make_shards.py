#!/usr/bin/env python
"""Write img2dataset-style image-caption shards (train/ and test/) from real data that packages ship.

Examples:
  python jobs/make_shards.py --output data/shards --dataset fashion-mnist --limit-train 6000 --limit-test 1000
  python jobs/make_shards.py --output s3://bucket/laion-like/ --dataset photos --layout parquet --image-format jpg
"""
import argparse
import time

from _common import run

from pipeline.common import storage
from pipeline.data.make_shards import fashion_records, photo_records, scene_records, write_shards


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="output folder or s3:// prefix; train/ and test/ are made under it")
    p.add_argument("--dataset", choices=["fashion-mnist", "photos", "all", "scenes"], default="fashion-mnist",
                   help="fashion-mnist: 70k labelled 28x28 garments (Debian dataset-fashion-mnist) with template "
                        "captions; photos: ~45 real colour photos bundled with scikit-image, scikit-learn and "
                        "mvtb-data with hand-written captions; all: both; scenes: 64x64 canvases of 2-3 Fashion-MNIST "
                        "items with their label map (KEY.seg.png / a seg column) and boxes (layout in the metadata), "
                        "for semantic synthesis and layout-to-image (--limit-train/--limit-test scenes; default "
                        "10000 / 1000)")
    p.add_argument("--layout", choices=["webdataset", "parquet"], default="webdataset",
                   help="img2dataset output format: webdataset tars (+ .parquet metadata and _stats.json) or "
                        "parquet files holding the image bytes")
    p.add_argument("--image-format", choices=["png", "jpg"], default="png",
                   help="encoding of the images inside the shards (png is lossless)")
    p.add_argument("--shard-size", type=int, default=1000, help="records per shard (img2dataset default: 10000)")
    p.add_argument("--limit-train", type=int, default=0,
                   help="at most this many Fashion-MNIST train images (0 = all 60000)")
    p.add_argument("--limit-test", type=int, default=0,
                   help="at most this many Fashion-MNIST test images (0 = all 10000)")
    p.add_argument("--seed", type=int, default=0, help="fixes the sample order, captions and LAION-style scores")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    t0 = time.time()
    for split, limit in (("train", a.limit_train), ("test", a.limit_test)):
        def records():
            if a.dataset in ("fashion-mnist", "all"):
                yield from fashion_records(split, limit or None, a.seed, a.image_format)
            if a.dataset in ("photos", "all"):
                yield from photo_records(split, a.seed, a.image_format)
            if a.dataset == "scenes":
                yield from scene_records(split, limit or (10000 if split == "train" else 1000), a.seed)
        out = storage.join(a.output, split)
        res = write_shards(records(), out, a.layout, a.shard_size, a.seed,
                           progress=lambda i, path: print(f"  shard {i:5d} -> {path}", flush=True))
        print(f"[make_shards] {split}: {res['records']} records in {res['shards']} shards at {out} "
              f"({res['written']} written, {res['kept_existing']} already there)", flush=True)
    print(f"[make_shards] done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    run(main, "make_shards")
