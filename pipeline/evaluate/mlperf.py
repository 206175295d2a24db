"""The MLPerf Training text-to-image evaluation (Stable Diffusion v2 benchmark), from local files: 30,000 COCO-2014
validation captions (one per image, a seeded random subset), images sampled with DDIM at 50 steps and guidance 8, FID
of their pool features (inception-2015-12-05.pt) against the reference statistics of the subset's real images, and
CLIP score as the raw cosine of OpenCLIP ViT-H-14 (ClipScore). MLPerf's quality target: FID <= 90 and CLIP >= 0.15.

Images are generated, featurised and scored a chunk at a time, so 30,000 of them never sit in memory at once.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

TARGET = {"fid": 90.0, "clip_score": 0.15}
WHERE = {  # each input file and where it comes from, for the errors that name a missing one
    "captions": "COCO-2014's annotations/captions_val2014.json (cocodataset.org), or MLPerf's val2014_30k.tsv "
                "(mlcommons/training stable_diffusion/scripts/datasets/coco2014-validation-download-prompts.sh)",
    "inception_weights": "the TorchScript Inception-v3 of StyleGAN3/clean-fid, inception-2015-12-05.pt",
    "clip_model": "a CLIP folder in transformers' format; MLPerf's ViT-H-14 is the Hugging Face repository "
                  "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "fid_stats": "MLPerf's val2014_30k_stats.npz (mu, sigma of the subset's pool features; "
                 "mlcommons/training stable_diffusion/scripts/datasets/coco2014-validation-download-stats.sh), "
                 "or an .npz of your own with arrays mu and sigma",
}


@dataclass(frozen=True)
class MLPerfOptions:
    model: str
    captions: str
    inception_weights: str
    clip_model: str
    fid_stats: str
    num_samples: int = 30000
    seed: int = 2023                  # the caption subset's seed, as MLPerf's split script uses
    steps: int = 50
    cfg_scale: float = 8.0
    sampler: str = "auto"             # ddim for a ddpm model (MLPerf's), the model's own ODE sampler for flow
    chunk: int = 1000                 # images generated and scored at a time
    batch_size: int = 50
    workers: int = 0
    cpus_per_worker: float = 1.0
    tracking_uri: str = ""


def check_files(o: MLPerfOptions) -> None:
    """Every input present, or one error naming each missing one and where it comes from."""
    missing = [f"--{k.replace('_', '-')} {getattr(o, k) or '(not given)'}: {where}" for k, where in WHERE.items()
               if not getattr(o, k) or not Path(getattr(o, k)).exists()]
    if missing:
        raise FileNotFoundError("--protocol mlperf reads these from local files, nothing is downloaded; missing:\n  "
                                + "\n  ".join(missing))


def read_captions(path: str, n: int, seed: int) -> list[str]:
    """n captions: from COCO's annotations JSON one per image (its first, by annotation id), a random subset drawn
    with `seed`; from a TSV with a `caption` column (MLPerf's val2014_30k.tsv, already their subset) the first n."""
    if path.endswith(".json"):
        anns = sorted(json.loads(Path(path).read_text())["annotations"], key=lambda a: a["id"])
        first = {}
        for a in anns:
            first.setdefault(a["image_id"], a["caption"].strip())
        captions = list(first.values())
        captions = [captions[i] for i in np.random.RandomState(seed).permutation(len(captions))]
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if not rows or "caption" not in rows[0]:
            raise ValueError(f"{path}: a TSV needs a header with a 'caption' column (MLPerf's val2014_30k.tsv has id, "
                             f"image_id, caption)")
        captions = [r["caption"].strip() for r in rows]
    if len(captions) < n:
        raise ValueError(f"{path} holds {len(captions)} captions (one per image); --num-samples {n} asks for more")
    return captions[:n]


def fid_from_stats(feats: torch.Tensor, stats: str) -> float:
    """Fréchet distance of the features' Gaussian to the reference (mu, sigma):
    |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the trace of the root from the eigenvalues of S1 S2."""
    ref = np.load(stats)
    mu2, s2 = torch.from_numpy(ref["mu"]).double(), torch.from_numpy(ref["sigma"]).double()
    f = feats.double()
    if f.shape[1] != mu2.shape[0]:
        raise ValueError(f"{stats} holds statistics of {mu2.shape[0]}-d features; the Inception gives "
                         f"{f.shape[1]}-d ones: use the statistics of the same network's pool features")
    mu1, s1 = f.mean(0), torch.cov(f.T)
    root = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * root)


def evaluate_mlperf(o: MLPerfOptions, log=print) -> dict:
    """-> {"fid", "clip_score", "clip_score_x100", "target", "meets_target", "num_samples", ...}."""
    from pipeline.evaluate.clip_score import ClipScore
    from pipeline.evaluate.model_eval import GenerateBatch, ModelEvalOptions, generate_all, generation_workers
    from pipeline.evaluate.scores import from_uint8, load_feature_net
    check_files(o)
    t0 = time.time()
    captions = read_captions(o.captions, o.num_samples, o.seed)
    inception, clip = load_feature_net(o.inception_weights), ClipScore(o.clip_model)
    mo = ModelEvalOptions(model=o.model, input="", num_samples=o.num_samples, sampler=o.sampler, seed=0,
                          batch_size=o.batch_size, workers=o.workers, cpus_per_worker=o.cpus_per_worker,
                          tracking_uri=o.tracking_uri)
    local = GenerateBatch(mo, torch.get_num_threads())
    from ldm.sampling import resolve_sampler
    mo = replace(mo, sampler=resolve_sampler(o.sampler, local.sampler.net.cfg.diffusion.prediction))
    workers = generation_workers(mo)
    log(f"[evaluate] MLPerf protocol: {len(captions)} captions of {o.captions} (seed {o.seed}), {mo.sampler} "
        f"{o.steps} steps, guidance {o.cfg_scale:g}, on {workers} worker(s)")
    feats, cosines = [], []
    for i in range(0, len(captions), o.chunk):
        part = captions[i:i + o.chunk]
        images = from_uint8(generate_all(replace(mo, seed=i), local, part, o.cfg_scale, o.steps, workers))
        feats.append(inception(images, with_logits=False)[0])
        cosines.append(clip.cosines(images, part))
        log(f"[evaluate] {i + len(part)}/{len(captions)} images scored ({time.time() - t0:.0f} s)")
    cos = torch.cat(cosines).double().mean().item()
    r = {"fid": fid_from_stats(torch.cat(feats), o.fid_stats), "clip_score": cos,
         "clip_score_x100": max(100.0 * cos, 0.0), "clip_model": clip.name, "num_samples": len(captions),
         "captions": o.captions, "seed": o.seed, "sampler": mo.sampler, "steps": o.steps, "cfg_scale": o.cfg_scale,
         "model": o.model, "model_run_id": local.sampler.info.get("mlflow_run_id", ""), "target": TARGET,
         "seconds": round(time.time() - t0, 1)}
    r["meets_target"] = r["fid"] <= TARGET["fid"] and r["clip_score"] >= TARGET["clip_score"]
    return r
