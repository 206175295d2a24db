#!/usr/bin/env python
"""Train the first-stage autoencoder (paper §3.1): KL- or VQ-regularised, any f, on img2dataset shards,
with Ray Train (DDP across workers), evaluated on held-out shards and tracked in MLflow.

  python jobs/train_autoencoder.py --input data/shards/train --preset demo --reg kl --f 4 --max-steps 4000 \\
      --mlflow-uri sqlite:///mlruns/mlflow.db
  python jobs/train_autoencoder.py --input data/shards/train --preset demo --compare-f 2,4,8   # paper §4.1
  python jobs/train_autoencoder.py --input data/shards/train --preset demo --compare-f 1,2,4,8,16 \
      --compare-ldm-steps 300   # ... carried through: an LDM per f, FD of its samples and its throughput

The result (export/autoencoder.safetensors in the last checkpoint, the MLflow `model` artifact and a
registered model version) is what `jobs/encode_latents.py --autoencoder` takes.

Exit status: 0 trained; 2 bad arguments, config, data or checkpoint (not retried); 4 training failed;
5 storage or MLflow unreachable.
"""
import argparse

from _common import add_run_args, options_from, run

from pipeline.compare_f import CompareFOptions
from pipeline.train.options import AETrainOptions

D = {k: f.default for k, f in AETrainOptions.__dataclass_fields__.items()}  # the dataclass holds every default
CF = {k: f.default for k, f in CompareFOptions.__dataclass_fields__.items()}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*",
                   help="config overrides key=value (e.g. autoencoder.ch=64 loss.disc_start=2000)")
    d = p.add_argument_group("data and model")
    d.add_argument("--input", required=True, help="training shards: folder, glob or list file (local or s3://)")
    d.add_argument("--eval-input", default=D["eval_input"],
                   help="held-out shards for PSNR/SSIM/FD (default: the sibling test/ "
                   "folder of a .../train input)")
    d.add_argument("--preset", default=D["preset"], help="config preset whose autoencoder/loss sections are used")
    d.add_argument("--config", default=D["config_yaml"], help="YAML config applied on top of the preset")
    d.add_argument("--reg", choices=["kl", "vq"], default=D["reg"], help="regularisation (default: the preset's)")
    d.add_argument("--f", type=int, default=D["f"], help="downsampling factor, a power of two (default: the preset's)")
    d.add_argument("--compare-f", default="", help="comma-separated f values: train one model per f and report "
                   "PSNR vs latent size (paper §4.1) as an MLflow parent run with child runs")
    cf = p.add_argument_group("--compare-f carried through to samples (paper §4.1, Fig. 6)")
    cf.add_argument("--compare-ldm-steps", type=int, default=CF["ldm_steps"], help="for each f also encode the "
                    "training shards, train an LDM this many steps and score its samples (0 = reconstructions only)")
    cf.add_argument("--compare-ldm-batch-size", type=int, default=CF["ldm_batch_size"], help="LDM batch per worker")
    cf.add_argument("--compare-ldm-lr", type=float, default=CF["ldm_lr"], help="LDM peak learning rate (cosine)")
    cf.add_argument("--compare-eval-samples", type=int, default=CF["eval_samples"],
                    help="samples per f scored (FD, KID) against the held-out images of --eval-input")
    cf.add_argument("--compare-sample-steps", type=int, default=CF["sample_steps"], help="DDIM steps of those samples")
    cf.add_argument("--compare-cfg-scale", type=float, default=CF["cfg_scale"], help="their guidance scale")
    c = add_run_args(p, AETrainOptions, "images")["tracking"]
    c.add_argument("--register-model", default=D["register_model"],
                   help="registered model name (default ae-PRESET-REG-fF)")
    c.add_argument("--eval-max-images", type=int, default=D["eval_max_images"],
                   help="held-out images evaluated (0 = all)")
    c.add_argument("--no-fd", action="store_true", help="skip the FD-EffNetLite0 metric (faster)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from pipeline.compare_f import run_compare_f
    from pipeline.train.autoencoder_driver import run_train_autoencoder
    a = parse(argv)
    opts = options_from(AETrainOptions, a, config_yaml=a.config, overrides=tuple(a.overrides), eval_fd=not a.no_fd)
    if a.compare_f:
        study = CompareFOptions(ldm_steps=a.compare_ldm_steps, ldm_batch_size=a.compare_ldm_batch_size,
                                ldm_lr=a.compare_ldm_lr, eval_samples=a.compare_eval_samples,
                                sample_steps=a.compare_sample_steps, cfg_scale=a.compare_cfg_scale)
        run_compare_f(opts, [int(x) for x in a.compare_f.split(",") if x.strip()], study)
    else:
        run_train_autoencoder(opts)
    return 0


if __name__ == "__main__":
    run(main, "stage1")
