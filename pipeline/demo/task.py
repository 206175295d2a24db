"""What a demo task is: a conditioning kind's LDM preset, how the demo prepares its data, and its judge.

One module per task under pipeline/demo/tasks/ subclasses `Task`, registers its preset and its instance; the demo's
run reads top to bottom and asks the task for its judge, its figures, its headline and its report lines.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pipeline.data.make_shards import SCENE_SIZE


@dataclass(frozen=True)
class DemoSize:
    train_images: int
    test_images: int
    ae_steps: int
    ldm_steps: int
    samples_per_class: int
    eval_samples: int            # images per FD/KID during LDM training (twice: half-way and at the end)
    ldm_batch_size: int = 64     # the LDM's images per step


@dataclass(frozen=True)
class DemoOptions:
    out: str = "demo-out"
    size: str = "default"
    mlflow_uri: str = ""                 # "" = sqlite under OUT
    num_cpus: int = 0
    seed: int = 0
    cfg_scale: float = 8.0               # guidance of the text and class tasks' grids (and of the training grids)
    sample_steps: int = 25
    task: str = "text"                   # a registered task's name


@dataclass(frozen=True)
class Task:
    """A demo task. Its data settings say what the encode job caches beside the latents; `judge` scores the trained
    model's samples; `figures` are the summary keys it adds; `headline` and `report` say them."""
    name: str                    # --task NAME
    preset: str                  # the LDM's preset (registered by the task's module); its stage 1 is the demo's
    title: str                   # what stage 4 trains
    tag: str                     # suffix of the task's cache, LDM run, experiment, model, grid and summary
    text: bool = False           # the cache carries MiniLM tokens and embeddings
    prompts: tuple = ()          # the training-time sample grids' conditions (): the kind's defaults from the cache
    lowres_factor: int = 0       # the cache keeps each image downscaled by this (super-resolution's condition)
    inpaint_variants: int = 0    # the cache keeps this many masked-image latents per image (inpainting's condition)
    ldm_steps_factor: float = 1.0  # the LDM's steps relative to the size's
    eta: float = 0.0             # DDIM's noise when the demo samples (1: DDPM-like, ancestral)
    scenes: int = 0              # > 0: train on this many 64x64 scenes with label maps and boxes
    layout_boxes: int = 0        # > 0: train on whole scenes with up to this many boxes each (layout-to-image)
    cfg_scale: float = 0.0       # guidance of the judged samples (0: the demo's --cfg-scale)
    autocast: bool = False       # train and judge under bf16 autocast where the CPU has native bf16 kernels

    # ---- data
    def shards(self, split: str) -> str:
        """The shard folder under --out that this task encodes (train) or is judged on (test)."""
        return f"scenes-{split}" if self.scenes else split

    @property
    def canvas(self) -> int:
        """The size of the images the task is judged on: a scene task's samples are twice its training crops."""
        return SCENE_SIZE if self.scenes else 32

    @property
    def resolution(self) -> int:
        """The size of the crops the LDM trains on: whole scenes for a layout task (boxes do not survive crops)."""
        return SCENE_SIZE if self.layout_boxes else 32

    @property
    def crop(self) -> str:
        """A semantic task trains on one grid tile of each scene; the others on the whole (centre-cropped) image."""
        return "tile" if self.scenes and not self.layout_boxes else "center"

    @property
    def label_maps(self) -> bool:
        """Whether the task's cache and held-out scenes carry label maps: the semantic task's condition."""
        return bool(self.scenes) and not self.layout_boxes

    def ldm_steps(self, size: DemoSize) -> int:
        return max(1, round(size.ldm_steps * self.ldm_steps_factor))

    def precision(self) -> str:
        """The LDM's precision: autocast where asked for and the CPU computes bf16 natively, else fp32."""
        from pipeline.common.precision import cpu_bf16
        return "autocast" if self.autocast and cpu_bf16() else "fp32"

    # ---- judging
    def judging(self, size: DemoSize, opts: DemoOptions) -> str:
        """The title of the judging stage."""
        raise NotImplementedError

    def judge(self, export: str, clf, size: DemoSize, opts: DemoOptions, out: Path) -> dict:
        """The trained model's figures: "fd", "kid", "names", "num_real", "grid" and the task's own `figures`."""
        raise NotImplementedError

    figures: ClassVar[tuple[str, ...]] = ()  # the summary keys the judge adds (beside FD, KID and the grid)
    metrics: ClassVar[tuple[str, ...]] = ()  # those logged to MLflow as demo/KEY ("FD" in a key: the FD's name)
    # str.format templates over the summary (and `values`): the task's figure and its baseline; what the report
    # says of the samples, and of the grid
    headline_format: ClassVar[tuple[str, str]] = ("", "")
    report_format: ClassVar[tuple[str, str]] = ("", "")

    def values(self, s: dict) -> dict:
        """Values the templates need beyond the summary's own."""
        return {}

    def headline(self, s: dict) -> tuple[str, str]:
        """The task's figure and the baseline it is judged against."""
        return tuple(f.format(**s, **self.values(s)) for f in self.headline_format)

    def report(self, s: dict) -> tuple[str, str]:
        """What the closing report says of the samples, and of the grid."""
        fd = (f"{s['fd_name']} {s['sample_fd']:.1f}, KID {s['sample_kid']:.4f} against {s['fd_real_images']} "
              f"held-out images")
        return tuple(f.format(**s, fd_line=fd, **self.values(s)) for f in self.report_format)
