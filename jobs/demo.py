#!/usr/bin/env python
"""Run the whole paper end to end on this machine (CPU is enough): Fashion-MNIST shards with captions ->
stage-1 autoencoder -> latent cache -> LDM -> a sample grid for every class, judged by a Fashion-MNIST
classifier; everything tracked in MLflow (a sqlite store under --out unless --mlflow-uri).

  python jobs/demo.py                  # text-to-image (the README gives its time on 2 cores)
  python jobs/demo.py --task class     # class-conditional: the same pipeline conditioned on the labels
  python jobs/demo.py --task uncond    # unconditional: judged by FD against the same model untrained
  python jobs/demo.py --task sr        # x4 super-resolution: FD, PSNR, SSIM against bicubic upsampling
  python jobs/demo.py --task inpaint   # inpainting: FD and the holes' PSNR against biharmonic inpainting
  python jobs/demo.py --task semantic  # semantic synthesis: per-region class agreement, a sample at 2x the canvas
  python jobs/demo.py --task layout    # layout-to-image: per-box class agreement against the empty layout
  python jobs/demo.py --task all       # every task in turn under one --out, a table of their figures at the end
  python jobs/demo.py --quick          # a few minutes, smaller everything (poorer samples)

Ends by printing the stage-1 PSNR, the task's figures next to their baseline, the grid's path and how to open the
MLflow UI; several tasks then end with a table of every task's figure and baseline. Tasks run under one --out share
the shards and the stage-1 autoencoder.
"""
import argparse

from _common import run

from pipeline.demo import TASKS, DemoOptions


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=DemoOptions.task,
                   help="the task, a comma-separated list of tasks, or all (every task in turn in one process under "
                   "one --out, sharing the shards and stage 1; a table of every figure at the end). Tasks (the LDM's "
                   "conditioning): " + "; ".join(f"{name}: {t.title}" for name, t in TASKS.items()))
    p.add_argument("--quick", action="store_true", help="the small size: fewer images and steps, a few minutes")
    p.add_argument("--size", choices=["smoke", "quick", "default"], default="",
                   help="explicit size: smoke is a wiring check of every stage in a few minutes (its samples are poor)")
    p.add_argument("--out", default="demo-out", help="where shards, runs, the cache, the grid and MLflow go")
    p.add_argument("--mlflow-uri", default="", help="track to this MLflow instead of sqlite under --out")
    p.add_argument("--cfg-scale", type=float, default=DemoOptions.cfg_scale,
                   help="classifier-free guidance scale of the final grid (text and class; uncond samples unguided)")
    p.add_argument("--sample-steps", type=int, default=DemoOptions.sample_steps, help="DDIM steps of the final grid")
    p.add_argument("--num-cpus", type=int, default=0, help="CPUs of the embedded Ray (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, weights and samples")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from pipeline.common.tracking import credentials_to_env
    from pipeline.demo import run_tasks, task_list
    a = parse(argv)
    tasks = task_list(a.task)
    size = a.size or ("quick" if a.quick else "default")
    run_tasks(DemoOptions(out=a.out, size=size, mlflow_uri=credentials_to_env(a.mlflow_uri), num_cpus=a.num_cpus,
                          seed=a.seed, cfg_scale=a.cfg_scale, sample_steps=a.sample_steps), tasks)
    return 0


if __name__ == "__main__":
    run(main, "demo")
