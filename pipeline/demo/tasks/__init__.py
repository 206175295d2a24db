"""The demo's tasks, one module each (a conditioning kind's preset, its data settings and its judge), in the order
`--task all` runs them. Importing this package registers their presets."""
from pipeline.demo.tasks import inpaint, label, layout, semantic, sr, text, uncond

TASKS = {t.TASK.name: t.TASK for t in (text, label, uncond, sr, inpaint, semantic, layout)}

__all__ = ["TASKS"]
