#!/usr/bin/env python
"""Export a trained model for other tools: a diffusers folder (StableDiffusionPipeline or StableDiffusionXLPipeline
.from_pretrained loads it) or one .safetensors in the CompVis / SGM key layout (ComfyUI, A1111, diffusers'
from_single_file; and this project's --init-from).

  python jobs/export.py --model runs/ldm-sd15-.../checkpoint_000004/export/model.safetensors --format diffusers \\
      --out exported/sd15-continued
  python jobs/export.py --model models:/ldm-sd15/3 --format single-file --out sd15-continued.safetensors \\
      --mlflow-uri http://127.0.0.1:5000

The UNet is the EMA's (--raw for the trained weights), the first stage and text encoder(s) the ones the export names;
the latent scale goes into the VAE's scaling_factor (a shift or per-channel scale is folded into its 1x1 convolutions).
Only text-to-image models have such a layout: a class, layout, semantic, super-resolution or inpainting model is
refused with the reason (its ldm-ray export is the model).

Exit status: 0 written; 2 bad arguments or a model that cannot be exported; 5 storage or MLflow unreachable.
"""
import argparse

from _common import run

from pipeline.export.formats import FORMATS


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="what to export: an export (model.safetensors), a checkpoint or run dir (its newest "
                        "checkpoint's export), an MLflow model (models:/NAME/VERSION, runs:/ID/model), or a Stable "
                        "Diffusion diffusers folder / single file (converted to the other format)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="diffusers: a pipeline folder; single-file: one .safetensors in the CompVis / SGM layout")
    p.add_argument("--out", required=True, help="the folder (diffusers) or .safetensors file (single-file) to write")
    p.add_argument("--raw", action="store_true", help="the trained weights instead of their EMA")
    p.add_argument("--mlflow-uri", default="", help="MLflow tracking URI for models:/ and runs:/ (default: "
                   "MLFLOW_TRACKING_URI)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from pipeline.common.tracking import credentials_to_env
    from pipeline.export.formats import export_model
    a = parse(argv)
    export_model(a.model, a.format, a.out, use_ema=not a.raw, tracking_uri=credentials_to_env(a.mlflow_uri))
    return 0


if __name__ == "__main__":
    run(main, "export")
