"""The whole paper end to end on one CPU machine (jobs/demo.py): run.py reads top to bottom, each task
(pipeline/demo/tasks/) brings its preset and its judge."""
from pipeline.demo.run import SIZES, run_demo, run_tasks, task_list
from pipeline.demo.task import DemoOptions
from pipeline.demo.tasks import TASKS

__all__ = ["SIZES", "TASKS", "DemoOptions", "run_demo", "run_tasks", "task_list"]
