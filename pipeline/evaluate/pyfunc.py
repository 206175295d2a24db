"""An LDM export as an MLflow pyfunc model, so a registered model is served the usual MLflow way:

    model = mlflow.pyfunc.load_model("models:/ldm-demo/3")
    out = model.predict(pd.DataFrame({"prompt": ["a photo of a bag"], "seed": [0]}), params={"steps": 25})
    Image.open(io.BytesIO(out["image"][0]))

(`mlflow models serve`, `mlflow.pyfunc.spark_udf` and batch inference read the same model). Input: a `prompt`
column (a caption; the class id of a class-conditional model; "" for an unconditional one) and an optional
`seed` column (default: the row number); a super-resolution model reads low-res PNG/JPEG bytes from an `image`
column instead of the prompt (use cfg_scale 1), an inpainting model an `image` and a `mask` column (white = the
hole), a semantic synthesis model a `label_map` column (PNG of class ids), a layout-to-image model a `layout` column
(JSON: {"size": [H, W], "boxes": [[class, top, left, height, width], ...]} in pixels); params `steps`, `cfg_scale`,
`sampler`, `eta`. Output: one row per prompt with `prompt`, `seed` and `image` (PNG bytes, the training size; the
low-res size x the factor for SR; the image's or the label map's size for inpainting and semantic synthesis).

The model folder carries everything it samples with: the export (UNet, EMA UNet, trained text transformer) and
its first stage as artifacts, and the `ldm` and `pipeline` packages as code; a frozen HF text encoder is read from
the folder the export names (the offline MiniLM by default)."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import mlflow.pyfunc

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {"steps": 50, "cfg_scale": 5.0, "sampler": "ddim", "eta": 0.0}


class LDMPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pipeline.evaluate.sample import LDMSampler
        ae = context.artifacts.get("autoencoder") or context.model_config.get("autoencoder", "")
        self.sampler = LDMSampler(context.artifacts["ldm"], autoencoder=ae)

    def predict(self, context, model_input, params: dict | None = None):
        import pandas as pd

        from pipeline.evaluate.grid import png_bytes
        p = {**PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
        n = len(model_input)
        prompts = [str(x) for x in model_input["prompt"]] if "prompt" in model_input else [""] * n
        seeds = ([int(s) for s in model_input["seed"]] if "seed" in model_input else list(range(n)))
        images = self.sampler(request_conditions(self.sampler.kind, model_input), steps=int(p["steps"]),
                              cfg_scale=float(p["cfg_scale"]), sampler=str(p["sampler"]), eta=float(p["eta"]),
                              seeds=seeds)
        return pd.DataFrame({"prompt": prompts, "seed": seeds, "image": png_bytes(images)})


def request_conditions(kind, model_input) -> list:
    """A request's rows as the kind's sample conditions: each of the kind's inputs read from its column (a caption or
    class id from `prompt`, image bytes from `image`, JSON text from `layout`, ...)."""
    missing = [i.name for i in kind.inputs if i.name not in model_input]
    if missing:
        want = ", ".join(f"'{i.name}' ({i.help.split(':')[0].split(' (')[0]})" for i in kind.inputs)
        raise ValueError(f"a {kind.name}-conditioned model needs the column(s) {want}; the input has "
                         f"{list(model_input.columns)}")
    values = {i.name: [i.decode(v if isinstance(v, str) else bytes(v)) for v in model_input[i.name]]
              for i in kind.inputs}
    return kind.from_inputs(values, len(model_input))


def signature():
    """The served model's columns: `seed` and every registered kind's inputs (each model reads its own kind's)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from ldm.kinds import KINDS
    columns = {"prompt": "string", "seed": "long"}
    for kind in KINDS.values():
        columns.update({i.name: i.column_type for i in kind.inputs})
    return ModelSignature(
        inputs=Schema([ColSpec(t, name, required=False) for name, t in columns.items()]),
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("binary", "image")]),
        params=ParamSchema([ParamSpec("steps", "long", PARAMS["steps"]),
                            ParamSpec("cfg_scale", "double", PARAMS["cfg_scale"]),
                            ParamSpec("sampler", "string", PARAMS["sampler"]), ParamSpec("eta", "double", 0.0)]))


def log_pyfunc(uri: str, run_id: str, export: str, autoencoder: str, artifact: str = "pyfunc") -> None:
    """Write the pyfunc model of `export` (its first stage `autoencoder`: a file or MLflow/S3 URI is copied in;
    `random:PRESET` is recorded as such) and log it as the run's `artifact` folder."""
    import mlflow
    import safetensors
    import torch
    import transformers

    from pipeline.common.models import local_file
    artifacts = {"ldm": local_file(export, uri)}
    config = {}
    if autoencoder.startswith("random:"):
        config["autoencoder"] = autoencoder
    else:
        artifacts["autoencoder"] = local_file(autoencoder, uri)
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"safetensors=={safetensors.__version__}",
            f"transformers=={transformers.__version__}", f"mlflow=={mlflow.__version__}", "pillow", "pandas",
            "pyyaml"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, artifact)
        with warnings.catch_warnings():  # the signature is given; an input example would make MLflow run it
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            mlflow.pyfunc.save_model(path, python_model=LDMPyfunc(), artifacts=artifacts, model_config=config,
                                     code_paths=[str(ROOT / "ldm"), str(ROOT / "pipeline")], signature=signature(),
                                     pip_requirements=reqs)
        mlflow.MlflowClient(uri).log_artifacts(run_id, path, artifact)
