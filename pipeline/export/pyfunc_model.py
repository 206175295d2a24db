"""The served model's code (MLflow models-from-code): MLflow copies this file into the model folder and runs it to get
the model, so nothing is pickled and loading a registered model runs only this project's code (its `ldm` and
`pipeline` packages are bundled with it)."""
import mlflow

from pipeline.export.pyfunc import LDMPyfunc

mlflow.models.set_model(LDMPyfunc())
