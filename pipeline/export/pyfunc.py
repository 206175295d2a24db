"""An LDM export as an MLflow pyfunc model, so a registered model is served the usual MLflow way:

    model = mlflow.pyfunc.load_model("models:/ldm-demo/3")
    out = model.predict(pd.DataFrame({"prompt": ["a photo of a bag"], "seed": [0]}), params={"steps": 25})
    Image.open(io.BytesIO(out["image"][0]))

or `mlflow models serve -m models:/ldm-demo/3 --env-manager local -h 127.0.0.1 -p 5001`, then POST JSON to
/invocations. Input: the columns of the model's conditioning kind (ldm/kinds/: `prompt` for text and class models,
`image` for super-resolution, `image` + `mask` for inpainting, `label_map`, `layout`) and an optional `seed` column
(default: the row number); params `steps`, `cfg_scale`, `sampler`, `eta`. Output: one row per input row with
`prompt`, `seed` and `image` (PNG bytes).

The model is logged from code (pyfunc_model.py: nothing pickled) and carries everything it samples with as
artifacts: the export (UNet, EMA UNet, trained tau_theta), its first stage, and its frozen text encoder(s) with their
tokenizers; `pip_requirements` lists what that code imports, so it serves from a fresh environment."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import mlflow.pyfunc

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {"steps": 50, "cfg_scale": 5.0, "sampler": "auto", "eta": 0.0}


class LDMPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pipeline.evaluate.sample import LDMSampler
        ae = context.artifacts.get("autoencoder") or context.model_config.get("autoencoder", "")
        self.sampler = LDMSampler(context.artifacts["ldm"], autoencoder=ae,
                                  text_encoder=context.artifacts.get("text_encoder", ""))

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


REQUIREMENTS = ("torch", "numpy", "pandas", "pillow", "safetensors", "transformers", "tokenizers", "pyyaml",
                "fsspec", "mlflow")


def requirements() -> list[str]:
    """The packages the served code imports, pinned to what this environment runs."""
    from importlib.metadata import PackageNotFoundError, version
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


def text_artifact(source: str, dest: Path) -> str:
    """The frozen text encoder(s) an export names, copied into one folder the served model reads: a Hugging Face
    folder as it is, a diffusers pipeline's text_encoder(s) and tokenizer(s) with its model_index.json."""
    import shutil

    from ldm.text_encoders import encoder_folders, text_encoder_dir
    local = Path(text_encoder_dir(source))
    if not (local / "model_index.json").exists():
        shutil.copytree(local, dest)
        return str(dest)
    dest.mkdir(parents=True)
    shutil.copy(local / "model_index.json", dest / "model_index.json")
    for enc, tok in encoder_folders(str(local)):
        for src in (enc, tok):
            shutil.copytree(src, dest / Path(src).name, dirs_exist_ok=True)
    return str(dest)


def log_pyfunc(uri: str, run_id: str, export: str, autoencoder: str, artifact: str = "pyfunc") -> None:
    """Write the pyfunc model of `export` from code (pyfunc_model.py), with its first stage (a file, folder or MLflow
    URI is copied in; `random:PRESET` is recorded as such) and text encoder as artifacts, and log it as the run's
    `artifact` folder."""
    import mlflow

    from pipeline.common.models import local_file, text_encoder_path
    from pipeline.evaluate.sample import load_ldm
    export = local_file(export, uri)
    _, info = load_ldm(export)
    with tempfile.TemporaryDirectory() as d:
        artifacts, config = {"ldm": export}, {}
        if autoencoder.startswith("random:"):
            config["autoencoder"] = autoencoder
        else:
            artifacts["autoencoder"] = autoencoder if Path(autoencoder).is_dir() else local_file(autoencoder, uri)
        if info["text_encoder"].get("kind") == "hf":
            artifacts["text_encoder"] = text_artifact(text_encoder_path(info["text_encoder"]), Path(d) / "text")
        path = os.path.join(d, artifact)
        with warnings.catch_warnings():  # the signature is given; an input example would make MLflow run it
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            mlflow.pyfunc.save_model(path, python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                                     artifacts=artifacts, model_config=config, signature=signature(),
                                     code_paths=[str(ROOT / "ldm"), str(ROOT / "pipeline")],
                                     pip_requirements=requirements())
        mlflow.MlflowClient(uri).log_artifacts(run_id, path, artifact)
