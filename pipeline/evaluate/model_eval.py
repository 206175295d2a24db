"""Sample quality of an LDM export (paper §4): N images generated with fixed seeds from the held-out set's own
conditioning, scored against its real images (FD, KID, IS, precision/recall; pipeline/evaluate/scores.py) and,
on Fashion-MNIST, judged by the in-project classifier (prompt-class agreement). One call sweeps guidance scales
and sampling steps: the paper's FD-vs-guidance and FD-vs-steps curves as rows of one table.

Generation runs as Ray Data batch inference (an actor per worker, each with the model loaded once) when Ray has
more than one worker to give, else in this process. Every image has its own seed (seed + its index), so the
figures do not depend on how the prompts were batched or spread.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from ldm.sampling import resolve_sampler
from pipeline.evaluate.scores import from_uint8, to_uint8


@dataclass(frozen=True)
class ModelEvalOptions:
    model: str                                  # export: model.safetensors, s3://, mlflow-models:/NAME/VERSION
    input: str                                  # held-out shards (real images and their conditioning)
    num_samples: int = 500                      # generated (and real) images per point of the sweep
    cfg_scales: tuple[float, ...] = (4.0,)      # classifier-free guidance scales to sweep
    steps: tuple[int, ...] = (50,)              # sampling steps to sweep
    sampler: str = "auto"
    seed: int = 0                               # image i starts from the noise of seed + i
    batch_size: int = 50                        # prompts per generation batch
    workers: int = 0                            # generation workers (Ray Data actors); 0 = what Ray can give
    cpus_per_worker: float = 1.0
    inception_weights: str = ""                 # TorchScript Inception-v3 -> real FID/KID/IS
    autoencoder: str = ""                       # default: the export's own first stage
    text_encoder: str = ""                      # default: the export's own text encoder
    agreement: bool = True                      # Fashion-MNIST data: judge prompted class with the classifier
    baselines: bool = False                     # also score pure noise and the untrained model (same config)
    clip_model: str = ""                        # a local transformers CLIP: CLIP score against the captions
    tracking_uri: str = ""


class GenerateBatch:
    """Ray Data map_batches actor: the export loaded once, then prompts + seeds -> uint8 images."""

    def __init__(self, o: ModelEvalOptions, threads: int):
        from pipeline.evaluate.sample import LDMSampler
        torch.set_num_threads(max(1, threads))
        self.o = o
        self.sampler = LDMSampler(o.model, o.autoencoder, o.text_encoder, tracking_uri=o.tracking_uri)

    def __call__(self, batch: dict, cfg_scale: float, steps: int) -> dict:
        prompts = [str(p) for p in batch["prompt"]]  # captions, or class ids the kind reads back
        images = self.sampler(prompts, steps=steps, cfg_scale=cfg_scale, sampler=self.o.sampler,
                              seeds=[int(s) for s in batch["seed"]])
        return {"index": batch["index"], "image": to_uint8(images)}


def generation_workers(o: ModelEvalOptions) -> int:
    import ray
    if o.workers:
        return o.workers
    if not ray.is_initialized():
        return 1
    return max(1, int(ray.cluster_resources().get("CPU", 1) // max(o.cpus_per_worker, 1e-3)))


def generate_all(o: ModelEvalOptions, local, prompts: list, cfg_scale: float, steps: int, workers: int) -> np.ndarray:
    """uint8 images for `prompts` in order; image i from seed o.seed + i."""
    seeds = [o.seed + i for i in range(len(prompts))]
    if workers <= 1:
        out = [local({"index": np.arange(i, min(i + o.batch_size, len(prompts))),
                      "prompt": np.array([str(p) for p in prompts[i:i + o.batch_size]], dtype=object),
                      "seed": np.array(seeds[i:i + o.batch_size])}, cfg_scale, steps)["image"]
               for i in range(0, len(prompts), o.batch_size)]
        return np.concatenate(out)
    import ray
    items = [{"index": i, "prompt": str(p), "seed": s} for i, (p, s) in enumerate(zip(prompts, seeds))]
    ds = ray.data.from_items(items, override_num_blocks=max(workers, len(items) // o.batch_size))
    ds = ds.map_batches(GenerateBatch, fn_constructor_kwargs={"o": o, "threads": int(max(1, o.cpus_per_worker))},
                        fn_kwargs={"cfg_scale": cfg_scale, "steps": steps}, batch_size=o.batch_size,
                        batch_format="numpy", concurrency=workers, num_cpus=o.cpus_per_worker)
    got = {}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        got.update(zip(b["index"].tolist(), b["image"]))
    return np.stack([got[i] for i in range(len(prompts))])


def evaluate_model(o: ModelEvalOptions, log=print) -> dict:
    """-> {"rows": one dict per (cfg_scale, steps), "feature_net", "num_samples", "seed", "model_run_id", ...}."""
    from pipeline.evaluate.held_out import read_held_out
    from pipeline.evaluate.scores import SampleScores, format_scores, load_feature_net
    t0 = time.time()
    local = GenerateBatch(o, torch.get_num_threads())
    kind, cfg = local.sampler.kind, local.sampler.net.cfg
    held = read_held_out(o.input, local.sampler.resolution, o.num_samples, **kind.held_out_reads(cfg))
    prompts = kind.held_out(cfg, held)
    scores = SampleScores(load_feature_net(o.inception_weights), held.images)
    judge = _judge(held, o, log)
    clip = _clip(held, o, len(prompts))
    o = replace(o, sampler=resolve_sampler(o.sampler, cfg.diffusion.prediction))  # "auto" -> the model's own
    workers = generation_workers(o)
    log(f"[evaluate] {o.model}: {len(prompts)} held-out images of {o.input} ({local.sampler.mode} conditioning), "
        f"features {scores.net.name}, generation on {workers} worker(s)")
    rows = []
    for cfg_scale in o.cfg_scales:
        for steps in o.steps:
            t = time.time()
            images = from_uint8(generate_all(o, local, prompts, cfg_scale, steps, workers))
            row = score_point(scores, judge, images, o.seed, clip, cfg_scale=cfg_scale, steps=steps)
            row["seconds"] = round(time.time() - t, 1)
            rows.append(row)
            agree = f", agreement {100 * row['agreement']:.1f}%" if "agreement" in row else ""
            log(f"[evaluate] cfg {cfg_scale:g}, {o.sampler} {steps} steps: {format_scores(row)}{agree} "
                f"({row['seconds']:.0f} s)")
    base = baselines(o, local, prompts, scores, judge, clip) if o.baselines else []
    for row in base:
        log(f"[evaluate] baseline {row['baseline']}: {format_scores(row)}")
    names = rows[0]["names"]
    return {"baselines": base, "model": o.model, "input": o.input, "feature_net": scores.net.name, "names": names,
            "num_samples": len(prompts), "seed": o.seed, "sampler": o.sampler, "conditioning": local.sampler.mode,
            "model_run_id": local.sampler.info.get("mlflow_run_id", ""), "rows": rows,
            "seconds": round(time.time() - t0, 1)}


def baselines(o: ModelEvalOptions, local: GenerateBatch, prompts: list, scores, judge, clip=None) -> list[dict]:
    """What the model's figures must beat, at the sweep's first point: uniform noise images, and the same
    model untrained (the export's config, weights freshly initialised with the seed)."""
    from ldm.model import LatentDiffusion
    res = local.sampler.resolution
    g = torch.Generator().manual_seed(o.seed)
    noise = from_uint8(to_uint8(torch.rand(len(prompts), 3, res, res, generator=g) * 2 - 1))
    trained = local.sampler.net
    torch.manual_seed(o.seed)
    local.sampler.net = LatentDiffusion(trained.cfg).eval()
    try:
        untrained = from_uint8(generate_all(o, local, prompts, o.cfg_scales[0], o.steps[0], 1))
    finally:
        local.sampler.net = trained
    return [score_point(scores, judge, images, o.seed, clip, baseline=name, cfg_scale=o.cfg_scales[0],
                        steps=o.steps[0]) for name, images in (("noise", noise), ("untrained", untrained))]


def score_point(scores, judge, images: torch.Tensor, seed: int, clip=None, **tags) -> dict:
    """One row of the table: `tags`, the scores of `images`, the judge's agreement and the CLIP score where there
    are ones."""
    row = {**tags, **scores.score(images, seed=seed)}
    if judge is not None:
        row["agreement"] = judge(images)
    if clip is not None:
        row.update(clip(images))
    return row


def _clip(held, o: ModelEvalOptions, n: int):
    """images -> CLIP score against the held-out records' captions (the prompts they were sampled from); None
    without --clip-model."""
    if not o.clip_model:
        return None
    from pipeline.evaluate.clip_score import ClipScore
    scorer, captions = ClipScore(o.clip_model), list(held.captions[:n])
    return lambda images: scorer.score(images, captions)


def _judge(held, o: ModelEvalOptions, log):
    """images -> the share the Fashion-MNIST classifier puts in the class their held-out record was captioned
    with; None where the data is not Fashion-MNIST or agreement is off."""
    if not (o.agreement and held.fashion_mnist and held.labels is not None):
        return None
    from pipeline.evaluate.classifier import load_judge, predict
    clf, _ = load_judge(log=log)
    labels = torch.tensor(held.labels)
    return lambda images: float((predict(clf, images) == labels).float().mean())


def format_table(r: dict) -> str:
    n = r["names"]
    has_agree = "agreement" in r["rows"][0]
    head = f"| cfg | steps | {n['fd']} | {n['kid']} | {n['is']} | precision | recall |" + (
        " agreement |" if has_agree else "") + (" CLIP score (x100) |" if "clip_score" in r["rows"][0] else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for x in r["rows"] + r.get("baselines", []):
        cells = [x.get("baseline", f"{x['cfg_scale']:g}"), str(x["steps"]), f"{x['fd']:.2f}", f"{x['kid']:.4f}",
                 f"{x['is']:.2f}",
                 f"{x.get('precision', float('nan')):.3f}", f"{x.get('recall', float('nan')):.3f}"]
        if has_agree:
            cells.append(f"{100 * x['agreement']:.1f}%")
        if "clip_score" in x:
            cells.append(f"{x['clip_score']:.4f} ({x['clip_score_x100']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(r: dict, path: str) -> str:
    """FD and precision/recall against guidance (one line per step count) and FD against steps (one line per
    guidance scale): the paper's trade-off curves. Written atomically."""
    from pipeline.evaluate.grid import figure, save_figure
    rows, n = r["rows"], r["names"]
    scales, steps = sorted({x["cfg_scale"] for x in rows}), sorted({x["steps"] for x in rows})
    at = {(x["cfg_scale"], x["steps"]): x for x in rows}
    fig, ax = figure(3, (15, 4))
    for s in steps:
        ax[0].plot(scales, [at[c, s]["fd"] for c in scales], "o-", label=f"{s} steps")
        ax[1].plot(scales, [at[c, s].get("precision", np.nan) for c in scales], "o-", label=f"precision, {s} steps")
        ax[1].plot(scales, [at[c, s].get("recall", np.nan) for c in scales], "s--", label=f"recall, {s} steps")
        if "agreement" in rows[0]:
            ax[1].plot(scales, [at[c, s]["agreement"] for c in scales], "^:", label=f"agreement, {s} steps")
    for c in scales:
        ax[2].plot(steps, [at[c, s]["fd"] for s in steps], "o-", label=f"cfg {c:g}")
    middle = "precision / recall" + (" / agreement" if "agreement" in rows[0] else "")
    for a, (xl, yl) in zip(ax, (("guidance scale", n["fd"]), ("guidance scale", middle), ("sampling steps", n["fd"]))):
        a.set_xlabel(xl)
        a.set_ylabel(yl)
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"{r['num_samples']} samples, {r['sampler']}, seed {r['seed']}: {r['model']}", fontsize=8)
    return save_figure(fig, path)
