#!/usr/bin/env python
"""Train the first-stage autoencoder (paper §3.1): KL- or VQ-regularised, any f, on img2dataset shards,
with Ray Train (DDP across workers), evaluated on held-out shards and tracked in MLflow.

  python jobs/train_autoencoder.py --input data/shards/train --preset demo --reg kl --f 4 --max-steps 4000 \\
      --mlflow-uri sqlite:///mlruns/mlflow.db
  python jobs/train_autoencoder.py --input data/shards/train --preset demo --compare-f 2,4,8   # paper §4.1

The result (export/autoencoder.safetensors in the last checkpoint, the MLflow `model` artifact and a
registered model version) is what `jobs/encode_latents.py --autoencoder` takes.

Exit status: 0 trained; 2 bad arguments, config, data or checkpoint (not retried); 4 training failed;
5 storage or MLflow unreachable.
"""
import argparse

from _common import add_run_args, options_from, run

from pipeline.train.options import AETrainOptions

D = {k: f.default for k, f in AETrainOptions.__dataclass_fields__.items()}  # the dataclass holds every default


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
    c = add_run_args(p, AETrainOptions, "images")["tracking"]
    c.add_argument("--register-model", default=D["register_model"],
                   help="registered model name (default ae-PRESET-REG-fF)")
    c.add_argument("--eval-max-images", type=int, default=D["eval_max_images"],
                   help="held-out images evaluated (0 = all)")
    c.add_argument("--no-fd", action="store_true", help="skip the FD-EffNetLite0 metric (faster)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from pipeline.train.autoencoder import run_compare_f, run_train_autoencoder
    a = parse(argv)
    opts = options_from(AETrainOptions, a, config_yaml=a.config, overrides=tuple(a.overrides), eval_fd=not a.no_fd)
    if a.compare_f:
        run_compare_f(opts, [int(x) for x in a.compare_f.split(",") if x.strip()])
    else:
        run_train_autoencoder(opts)
    return 0


if __name__ == "__main__":
    run(main, "stage1")
