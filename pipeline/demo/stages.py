"""The demo's stages, each a call into one room of the pipeline with the demo's settings: shards (pipeline/data),
stage 1 (pipeline/train, the autoencoder job), the latent cache (pipeline/encode), the LDM (pipeline/train)."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.demo.task import DemoOptions, DemoSize, Task


def make_shards(out: Path, size: DemoSize, seed: int, log, task: Task) -> None:
    """Fashion-MNIST items (stage 1 trains on them), and for a scene task its scenes with label maps and boxes."""
    from pipeline.data.make_shards import fashion_records, scene_records, write_shards
    for split, n in (("train", size.train_images), ("test", size.test_images)):
        r = write_shards(fashion_records(split, n, seed, "png"), str(out / "shards" / split), "webdataset", 1000,
                         seed=seed)
        log(f"[demo] {split}: {r['records']} records in {r['shards']} shards ({r['kept_existing']} already there)")
    if task.scenes:
        for split, n in (("train", min(task.scenes, size.train_images)), ("test", min(500, size.test_images))):
            r = write_shards(scene_records(split, n, seed), str(out / "shards" / task.shards(split)), "webdataset",
                             1000, seed=seed)
            log(f"[demo] {split} scenes: {r['records']} records in {r['shards']} shards ({r['kept_existing']} "
                f"already there)")


def train_stage1(out: Path, size: DemoSize, uri: str, seed: int, log) -> dict:
    """Train (or resume) the stage-1 autoencoder. Tasks run under one --out share it: once it has finished, its summary
    in OUT/stage1.json is reused as it stands (no Ray Train start, no second held-out evaluation or registration) as
    long as the size and seed match and its export is still there; otherwise the run resumes from its checkpoint."""
    from pipeline.common.storage import write_json_atomic
    from pipeline.train.autoencoder_driver import run_train_autoencoder
    from pipeline.train.options import AETrainOptions
    done, key = out / "stage1.json", {"ae_steps": size.ae_steps, "train_images": size.train_images, "seed": seed}
    if done.exists():
        prev = json.loads(done.read_text())
        if prev.get("key") == key and Path(prev["export"]).exists():
            log(f"[stage1] reused: finished earlier under this --out ({prev['step']} steps, held-out PSNR "
                f"{prev['eval']['psnr']:.2f} dB); autoencoder {prev['export']}")
            return prev
    summary = run_train_autoencoder(AETrainOptions(
        input=str(out / "shards" / "train"), preset="demo", overrides=("loss.rec_loss=l2",), max_steps=size.ae_steps,
        batch_size=16, lr=2e-3, warmup_steps=20, in_memory="yes",  # 12,000 small images: decode them once
        checkpoint_every=max(100, size.ae_steps // 2), sample_every=max(50, size.ae_steps // 2), log_every=100,
        storage_path=str(out / "runs"), name="stage1", mlflow_uri=uri, experiment="demo-stage1",
        register_model="demo-autoencoder", eval_max_images=min(1000, size.test_images), eval_fd=False,
        seed=seed), log)
    write_json_atomic(str(done), {**summary, "key": key})
    return summary


def encode_cache(out: Path, autoencoder: str, uri: str, log, task: Task, threads: int = 1) -> dict:
    """The task's latent cache; the one encoder actor uses `threads` (all the cores: the decode tasks are done long
    before it is)."""
    from pipeline.data.preprocess import PreprocessConfig
    from pipeline.encode.flow import EncodeOptions, run_encode
    return run_encode(EncodeOptions(input=str(out / "shards" / task.shards("train")),
                                    output=str(out / f"latents{task.tag}"), autoencoder=autoencoder,
                                    preprocess=PreprocessConfig(resolution=task.resolution, resize=task.canvas,
                                                                crop=task.crop, layout_boxes=task.layout_boxes,
                                                                lowres_factor=task.lowres_factor,
                                                                inpaint_variants=task.inpaint_variants,
                                                                label_maps=task.label_maps),
                                    text_encoder="" if task.text else "none", max_length=16,
                                    store_text_embeddings=task.text, batch_size=128, num_encoders=1,
                                    cpus_per_encoder=1.0, encoder_threads=threads,
                                    mlflow_uri=uri, experiment="demo-encode"), log)


def train_ldm(out: Path, size: DemoSize, uri: str, opts: DemoOptions, log, task: Task, **changes) -> dict:
    """The task's LDM: evaluated half-way and at the end (halves rounded up: 25 steps evaluate at 13 and 25); a scene
    task's held-out scenes are twice its training crops, judged at the end at their own size instead. `changes`
    replace the demo's training options (a study's variants)."""
    from dataclasses import replace

    from pipeline.train.ldm_driver import run_train
    from pipeline.train.options import TrainOptions
    steps = task.ldm_steps(size)
    return run_train(replace(TrainOptions(
        latents=str(out / f"latents{task.tag}"), preset=task.preset, num_workers=1, zero_stage=2,
        max_steps=steps, batch_size=size.ldm_batch_size, lr=2e-3, warmup_steps=50, lr_schedule="cosine",
        ema_decay=0.999, checkpoint_every=max(200, steps // 3), sample_every=max(200, steps // 2),
        sample_prompts=task.prompts, sample_steps=opts.sample_steps, cfg_scale=opts.cfg_scale, log_every=50,
        eval_every=0 if task.scenes else max(10, -(-steps // 2)), eval_samples=size.eval_samples,
        eval_input=str(out / "shards" / task.shards("test")),
        storage_path=str(out / "runs"), name=f"ldm{task.tag}", mlflow_uri=uri, experiment=f"demo-ldm{task.tag}",
        register_model=f"demo-ldm{task.tag}", seed=opts.seed, precision=task.precision()), **changes), log)


def cache_mb(out: Path, task: Task) -> float:
    """The task's latent cache on disk (its parquet parts)."""
    return round(sum(f.stat().st_size for f in (out / f"latents{task.tag}").glob("parts/*.parquet")) / 2 ** 20, 2)
