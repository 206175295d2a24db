#!/usr/bin/env python
"""Train a latent diffusion model (paper §3.2-3.3) on a latent cache with Ray Train + DeepSpeed ZeRO.

  python jobs/train_ldm.py --latents data/latents --preset demo --num-workers 2 --zero-stage 2 --max-steps 2000 \\
      --mlflow-uri sqlite:///mlruns/mlflow.db unet.model_channels=96 diffusion.parameterization=v

Trailing key=value arguments override the preset (after --config YAML). A rerun with the same --name and
--storage-path (or --resume RUN_DIR) continues from the latest checkpoint; raise --max-steps to train on.

Exit status: 0 trained; 2 bad arguments, config, cache or checkpoint (found before launch, or raised by a worker
and not retried); 4 training failed (non-finite loss, workers out of restarts); 5 storage or MLflow unreachable.
"""
import argparse

from _common import add_run_args, options_from, run, sigma_rel

from pipeline.common.precision import HELP, PRECISIONS
from pipeline.presets import PRESETS
from pipeline.train.options import TrainOptions

D = {k: f.default for k, f in TrainOptions.__dataclass_fields__.items()}  # the dataclass holds every default


def _sigma_rels(text: str) -> tuple[float, ...]:
    values = tuple(sigma_rel(v) for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: give relative stds, e.g. 0.05,0.10")
    return values


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. unet.model_channels=64)")
    d = p.add_argument_group("data and model")
    d.add_argument("--latents", required=True, help="latent cache written by jobs/encode_latents.py (local or s3://)")
    d.add_argument("--preset", default=D["preset"],
                   help="config preset (default: demo, or with --init-from the model's own; ldm/config/presets.py, "
                   "the demo tasks' in pipeline/demo/tasks/): "
                   + ", ".join(PRESETS))
    d.add_argument("--config", default=D["config_yaml"], help="YAML config applied on top of the preset")
    d.add_argument("--autoencoder", default=D["autoencoder"],
                   help="first stage for sample grids (default: the cache's own source); "
                   "its identity must match the cache's")
    d.add_argument("--text-encoder", default=D["text_encoder"],
                   help="frozen text encoder folder (default: the cache's)")
    d.add_argument("--filter", default=D["filter"],
                   help="train on the cache's rows that pass, without re-encoding: clauses COLUMN OP NUMBER joined by "
                   "'and', e.g. 'punsafe < 0.1 and aesthetic >= 5 and orig_side >= 256'; columns: punsafe, "
                   "pwatermark, aesthetic, similarity (the shards' LAION scores), orig_w, orig_h, orig_side (shorter "
                   "original side), label; a row without the score fails its clause")
    d.add_argument("--flip-prob", type=float, default=D["flip_prob"],
                   help="train on each sample mirrored left-right with this probability, the caption left as is: the "
                   "latent of the mirrored image comes from the cache (encode with --flip-latents); -1 = auto: 0.5 "
                   "when the cache has flipped latents and the model's condition is not spatial (a label map, boxes, "
                   "a low-res or masked image would need mirroring too), else 0")
    d.add_argument("--resolution", type=int, default=D["resolution"],
                   help="train on this resolution of a multi-resolution cache (encode --resolutions 256,512); rows "
                   "whose image is smaller than it are left out (0 = the cache's first resolution)")
    d.add_argument("--resume-from", default=D["resume_from"],
                   help="start a new phase from another run (a run dir, a checkpoint dir or mlflow:RUN_ID), e.g. a "
                   "256 px run continued at --resolution 512: its weights, optimizer, EMA and step carry over and the "
                   "data position restarts; this run gets its own --name and MLflow run, filed under the other's. "
                   "--max-steps counts on from the other's steps")
    d.add_argument("--init-from", default=D["init_from"],
                   help="start a new run from these weights: a Stable Diffusion diffusers folder or single "
                   ".safetensors/.ckpt file (SD 1.x, 2.x, SDXL base), or an export of ours (a folder, mlflow:RUN_ID or "
                   "models:/NAME/VERSION). Without --preset the config comes from the model; the cache must be "
                   "encoded with the same autoencoder and text encoder (encode_latents.py --autoencoder/--text-encoder "
                   "FOLDER). The weights carry over (the run's EMA starts from the source's EMA where it has one); the "
                   "optimizer and the step count start fresh")
    g = add_run_args(p, TrainOptions, "latents")
    t = g["optimisation"]
    t.add_argument("--grad-accum", type=int, default=D["grad_accum"],
                   help="micro-steps per optimizer step; the global batch is --batch-size x data streams x this")
    t.add_argument("--data-streams", type=int, default=D["data_streams"],
                   help="the streams the data order is planned over, each --batch-size rows per micro-step; fixed "
                   "for a run, so a restart on another --num-workers (any that divides it) reads the same global "
                   "batches in the same order, with the same noise (default: a continued run's own, else "
                   "--num-workers)")
    t.add_argument("--weight-decay", type=float, default=D["weight_decay"], help="AdamW weight decay")
    t.add_argument("--grad-clip", type=float, default=D["grad_clip"], help="clip the global gradient norm (0 = off)")
    t.add_argument("--ema-every", type=int, default=D["ema_every"],
                   help="update the EMA every N steps (ZeRO-3: each worker averages its own partition, no gather)")
    t.add_argument("--posthoc-ema", type=_sigma_rels, nargs="?", const=(0.05, 0.10), default=D["posthoc_ema"],
                   metavar="S,S", help="also keep EDM2's power-function EMA profiles of these relative stds (bare "
                   "flag: 0.05,0.10) and snapshot them at every checkpoint (into the checkpoint and the MLflow run's "
                   "posthoc_ema/), so that jobs/posthoc_ema.py can rebuild the EMA of any other sigma_rel after "
                   "training (ZeRO-3: each worker keeps its partition of them)")
    t.add_argument("--nan-tolerance", type=int, default=D["nan_tolerance"],
                   help="stop after this many skipped optimizer steps in a row: a micro-batch with a non-finite "
                   "loss is set aside and replaced (--grad-accum of them count one step), a step with non-finite "
                   "gradients is not applied (counts one)")
    s = g["distribution"]
    s.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=D["zero_stage"], help="DeepSpeed ZeRO stage")
    s.add_argument("--precision", choices=PRECISIONS, default=D["precision"],
                   help=HELP + "; bf16 training keeps an fp32 master copy in the optimizer. The run logs and "
                   "exports the resolved value")
    s.add_argument("--offload", action="store_true", help="ZeRO-Offload the optimizer (and params at stage 3) to CPU")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (inductor): pays on a GPU after a one-off compile of minutes; on a CPU "
                        "the compile outweighs the gain in short runs (docs/benchmarks.md)")
    s.add_argument("--deepspeed-config", default=D["deepspeed_config"],
                   help="JSON deep-merged over infra/deepspeed/zero{stage}.json")
    c = g["tracking"]
    c.add_argument("--sample-prompts", default="", help="';'-separated prompts (class ids for class-conditional "
                   "models); default: the first 8 distinct captions of the cache")
    c.add_argument("--sample-steps", type=int, default=D["sample_steps"], help="DDIM steps for sample grids")
    c.add_argument("--cfg-scale", type=float, default=D["cfg_scale"],
                   help="classifier-free guidance scale for sample grids")
    c.add_argument("--sample-seed", type=int, default=D["sample_seed"],
                   help="seed of the sample grids' noise (fixed across steps)")
    c.add_argument("--register-model", default=D["register_model"], help="registered model name (default ldm-PRESET)")
    e = p.add_argument_group("sample quality during training")
    e.add_argument("--eval-every", type=int, default=D["eval_every"], help="every N steps (and at the end) log "
                   "FD-EffNetLite0 / KID-EffNetLite0 of samples from the EMA weights to MLflow (0 = off)")
    e.add_argument("--eval-samples", type=int, default=D["eval_samples"],
                   help="images generated (with fixed seeds, --sample-steps, --cfg-scale) and compared per evaluation")
    e.add_argument("--eval-input", default=D["eval_input"], help="held-out shards: the first --eval-samples records "
                   "give the conditioning and the real images")
    return p.parse_args(argv)


def options(a) -> TrainOptions:
    return options_from(TrainOptions, a, config_yaml=a.config, overrides=tuple(a.overrides),
                        sample_prompts=tuple(x.strip() for x in a.sample_prompts.split(";") if x.strip()))


def main(argv=None) -> int:
    from pipeline.train.ldm_driver import run_train
    run_train(options(parse(argv)))
    return 0


if __name__ == "__main__":
    run(main, "train")
