"""A trained model out of the project: as a diffusers folder or a single-file checkpoint (formats.py), and as a served
MLflow model (pyfunc.py)."""
