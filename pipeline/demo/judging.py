"""What the demo's judges share: the held-out images every figure is measured against, FD / KID against them, the
Fashion-MNIST classifier on regions of a scene, and the grids."""
from __future__ import annotations

from pathlib import Path

from pipeline.demo.task import DemoSize, Task

# one colour per label-map id (0: background) for the figures
PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


def read_demo_held_out(out: Path, size: DemoSize, task: Task | None = None):
    """The held-out test images every task's FD / KID is measured against (up to 500): items, or a scene task's
    scenes with their label maps and boxes."""
    from pipeline.evaluate.held_out import read_held_out
    scenes = task is not None and bool(task.scenes)
    return read_held_out(str(out / "shards" / (task.shards("test") if scenes else "test")),
                         task.canvas if scenes else 32, min(500, size.test_images),
                         label_maps=scenes and task.label_maps, layouts=task.layout_boxes if scenes else 0)


def judge_inputs(export: str, out: Path, size: DemoSize, task: Task | None = None):
    """(the held-out set, how many of it to judge, the export's sampler): what every judge starts from."""
    from pipeline.evaluate.sample import LDMSampler
    held = read_demo_held_out(out, size, task)  # also the FD reference set
    return held, min(10 * size.samples_per_class, len(held.images)), LDMSampler(export)


def held_out_scores(out: Path, size: DemoSize, held=None):
    """FD / KID (EffNet-Lite0 features) against held-out real images (`held`, else read): a SampleScores."""
    from pipeline.evaluate.scores import SampleScores, load_feature_net
    return SampleScores(load_feature_net(), (held if held is not None else read_demo_held_out(out, size)).images)


def quantised(images):
    """Samples as an image file would hold them (8 bits), the way the held-out images were read."""
    from pipeline.evaluate.scores import from_uint8, to_uint8
    return from_uint8(to_uint8(images))


def region_agreement(clf, images, boxes: list[list]) -> float:
    """The share of boxes ([class, top, left, h, w]) whose crop, resized to 32x32 as the judge was trained, the
    classifier calls the box's class."""
    import torch
    import torch.nn.functional as F

    from pipeline.evaluate.classifier import predict
    crops, classes = [], []
    for img, items in zip(images, boxes):
        for c, t, le, h, w in items:
            crops.append(F.interpolate(img[None, :, t:t + h, le:le + w], size=(32, 32), mode="bicubic",
                                       align_corners=False).clamp(-1, 1)[0])
            classes.append(c)
    return round(float((predict(clf, torch.stack(crops)) == torch.tensor(classes)).float().mean()), 4)


def class_kept(clf, labels, **images) -> dict:
    """For each named batch of images, the share the classifier calls its held-out original's class."""
    import torch

    from pipeline.evaluate.classifier import predict
    labels = torch.tensor(labels)
    return {name: round(float((predict(clf, x) == labels).float().mean()), 4) for name, x in images.items()}


def save_rows(columns: list, out: Path, task: Task, what: str) -> str:
    """A grid of one row per held-out example, its `columns` (each a batch of images) side by side, and
    prompts-TAG.txt saying what each row holds."""
    import torch

    from pipeline.evaluate.grid import save_grid
    k = min(len(c) for c in columns)
    rows = torch.stack([c[:k] for c in columns], 1).flatten(0, 1)
    grid = out / f"samples_grid{task.tag}.png"
    save_grid(rows, str(grid), nrow=len(columns), upscale=3)
    (out / f"prompts{task.tag}.txt").write_text(f"each row: {what}\n")
    return str(grid)
