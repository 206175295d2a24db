#!/usr/bin/env python
"""Encode throughput and memory, measured side by side in one run.

1. images/s of jobs/encode_latents.py (Ray Data streaming, embedded Ray) vs a plain single-process loop
   (same shards, same autoencoder, same batch size, same decode/filter/resize code, parquet out);
2. peak memory (RSS of the whole process tree, Ray workers included) of the job at 1x vs 10x input.

  python bench/encode_throughput.py --images 1000 --autoencoder random:demo --resolution 32
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from matched import add_tiny, figures, tiny  # noqa: E402


def tree_rss(pid: int) -> int:
    import psutil
    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """Run a command; return (seconds, peak RSS of its process tree, stdout)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ))
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.1)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    done.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{out[-3000:]}")
    return time.time() - t0, peak, out


def baseline_loop(inp: str, out: str, autoencoder: str, resolution: int, batch_size: int) -> int:
    """The plain alternative: one process, read -> decode -> encode -> parquet, no Ray."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from ldm.autoencoder import encode_latent
    from ldm.text_encoders import FrozenHFTextEncoder
    from pipeline.common.models import load_autoencoder
    from pipeline.data.preprocess import PreprocessConfig, check_metadata, decode_image, resize_crop
    from pipeline.data.sources import discover_shards, read_shard
    torch.set_num_threads(os.cpu_count() or 1)
    ae = load_autoencoder(autoencoder).model
    text = FrozenHFTextEncoder("", 77)
    cfg = PreprocessConfig(resolution=resolution)
    shards = discover_shards(inp)
    n = 0
    Path(out).mkdir(parents=True, exist_ok=True)
    for i, uri in enumerate(shards.shards):
        rows, px, caps = [], [], []
        for r in read_shard({"uri": uri, "shard": i}, shards.layout):
            if not r["key"] or r["skip"] or check_metadata(r["caption"], r["meta"], cfg):
                continue
            im, reason = decode_image(r["image"], cfg)
            if reason:
                continue
            px.append(resize_crop(im, cfg, r["key"])[0])
            rows.append(r["key"])
            caps.append(r["caption"])
        means = []
        with torch.no_grad():
            for b in range(0, len(px), batch_size):
                x = torch.from_numpy(np.stack(px[b:b + batch_size])).permute(0, 3, 1, 2).float() / 127.5 - 1
                m, s = encode_latent(ae, x)
                means.append(m.flatten(1).half().numpy())
        ids, mask = text.tokenize(caps)
        mean = np.concatenate(means)
        tbl = pa.table({"key": rows, "latent_mean": pa.FixedSizeListArray.from_arrays(
            pa.array(mean.reshape(-1)), mean.shape[1]), "input_ids": ids.numpy().tolist()})
        buf = io.BytesIO()
        pq.write_table(tbl, buf)
        Path(out, f"{i:05d}.parquet").write_bytes(buf.getvalue())
        n += len(rows)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000, help="Fashion-MNIST images at 1x (10x for the memory run)")
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--autoencoder", default="random:demo")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-encoders", type=int, default=0, help="the job's encoder actors (0 = its default, auto)")
    ap.add_argument("--scale", type=int, default=10, help="input multiple for the memory comparison")
    ap.add_argument("--baseline", nargs=2, metavar=("INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    add_tiny(ap)
    a = tiny(ap.parse_args(), images=64, shard_size=32, scale=2, batch_size=32)
    if a.baseline:
        n = baseline_loop(a.baseline[0], a.baseline[1], a.autoencoder, a.resolution, a.batch_size)
        print(f"BASELINE_IMAGES {n}")
        return
    from pipeline.data.make_shards import fashion_records, write_shards
    tmp = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    for mult in (1, a.scale):
        write_shards(fashion_records("train", a.images * mult, 0, "png"), str(tmp / f"in{mult}"), "webdataset",
                     a.shard_size, seed=0)
    py = sys.executable
    job = [py, str(ROOT / "jobs" / "encode_latents.py"), "--autoencoder", a.autoencoder, "--resolution",
           str(a.resolution), "--batch-size", str(a.batch_size), "--num-encoders", str(a.num_encoders)]
    res = {}
    for mult in (1, a.scale):
        t_l, m_l, out = run_measured([py, __file__, "--baseline", str(tmp / f"in{mult}"), str(tmp / f"loop{mult}"),
                                      "--autoencoder", a.autoencoder, "--resolution", str(a.resolution),
                                      "--batch-size", str(a.batch_size)])
        assert int(out.split("BASELINE_IMAGES")[1].split()[0]) == a.images * mult
        t_j, m_j, _ = run_measured(job + ["--input", str(tmp / f"in{mult}"), "--output", str(tmp / f"out{mult}")])
        res[mult] = (t_l, m_l, t_j, m_j)
    print(f"\nencode throughput (Fashion-MNIST, {a.autoencoder}, {a.resolution}px, batch {a.batch_size}, "
          f"{a.num_encoders or 'auto'} encoder actor(s), {os.cpu_count()} CPUs; end to end, Ray start-up included)")
    for mult, (t_l, m_l, t_j, m_j) in res.items():
        n = a.images * mult
        print(f"  {n:6d} images: loop {n / t_l:7.1f} img/s ({t_l:5.1f} s) | job {n / t_j:7.1f} img/s ({t_j:5.1f} s) "
              f"| RATIO job/loop {t_l / t_j:5.2f}x")
    (_, ml1, _, mj1), (_, mlk, _, mjk) = res[1], res[a.scale]
    print("\npeak RSS of the whole process tree (the job: driver + Ray workers)")
    print(f"  job : 1x {mj1 / 2 ** 20:6.0f} MiB, {a.scale}x {mjk / 2 ** 20:6.0f} MiB "
          f"| RATIO {a.scale}x/1x {mjk / mj1:5.2f}x")
    print(f"  loop: 1x {ml1 / 2 ** 20:6.0f} MiB, {a.scale}x {mlk / 2 ** 20:6.0f} MiB "
          f"| RATIO {a.scale}x/1x {mlk / ml1:5.2f}x")
    print("  (streaming keeps the ratio near 1 whatever the input size)")
    (t_l1, _, t_j1, _), (t_lk, _, t_jk, _) = res[1], res[a.scale]
    figures(job_over_loop_1x=t_l1 / t_j1, **{f"job_over_loop_{a.scale}x": t_lk / t_jk},
            job_img_per_s_1x=a.images / t_j1, loop_img_per_s_1x=a.images / t_l1,
            **{f"job_memory_{a.scale}x_over_1x": mjk / mj1})


if __name__ == "__main__":
    main()
