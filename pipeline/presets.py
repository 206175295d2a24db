"""Every preset a job can name: the model presets of ldm/config/presets.py and the demo tasks' own, which each
task module under pipeline/demo/tasks/ registers beside its judge."""
from ldm.config import PRESETS, get_preset, load_config
from pipeline.demo import tasks  # noqa: F401 - importing the tasks registers their presets

__all__ = ["PRESETS", "get_preset", "load_config"]
