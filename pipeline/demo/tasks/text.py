"""The default task: text-to-image (paper §3.3) on Fashion-MNIST captions with the frozen MiniLM, judged by whether
the classifier sees the prompted class in each sample."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.data.make_shards import FASHION_CLASSES, FASHION_PHRASES
from pipeline.demo.judging import fd_line, held_out_scores, quantised
from pipeline.demo.task import DemoOptions, DemoSize, Task

PROMPTS = tuple(f"a photo of {p}" for p in FASHION_PHRASES)  # row c of the grid asks for class c


@dataclass(frozen=True)
class PromptedClasses(Task):
    """Sample every class from its prompt (a caption, or the label itself); the classifier says whether each image
    shows the class asked for."""
    figures = ("prompt_class_agreement", "per_class_agreement")
    metrics = ("prompt_class_agreement",)

    def judging(self, size: DemoSize, opts: DemoOptions) -> str:
        return (f"sample {size.samples_per_class} images for each of the 10 classes (DDIM {opts.sample_steps} steps, "
                f"CFG {opts.cfg_scale})")

    def judge(self, export: str, clf, size: DemoSize, opts: DemoOptions, out: Path) -> dict:
        import torch

        from pipeline.evaluate.classifier import predict
        from pipeline.evaluate.grid import save_grid
        from pipeline.evaluate.sample import sample_images
        prompts = list(self.prompts)
        images, used = sample_images(export, prompts, size.samples_per_class, steps=opts.sample_steps,
                                     cfg_scale=opts.cfg_scale, seed=opts.seed)
        labels = torch.tensor([prompts.index(p) for p in used])
        pred = predict(clf, images)
        grid = out / f"samples_grid{self.tag}.png"
        save_grid(images, str(grid), nrow=size.samples_per_class, upscale=3)
        (out / f"prompts{self.tag}.txt").write_text("\n".join(f"row {i}: {self.row_title(p)}"
                                                              for i, p in enumerate(prompts)))
        return {**held_out_scores(out, size).score(quantised(images)), "grid": str(grid),
                "prompt_class_agreement": round(float((pred == labels).float().mean()), 4),
                "per_class_agreement": {FASHION_CLASSES[c]: float((pred[labels == c] == c).float().mean())
                                        for c in range(10)}}

    def row_title(self, prompt) -> str:
        return str(prompt)

    def headline(self, s: dict) -> tuple[str, str]:
        return f"class agreement {100 * s['prompt_class_agreement']:.1f}%", "chance 10%"

    def report(self, s: dict) -> tuple[str, str]:
        per_class = ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["per_class_agreement"].items())
        return (f"agreement {100 * s['prompt_class_agreement']:.0f}% between the {self.asked} class and the "
                f"classifier\n            ({per_class}; the judge on real test images: "
                f"{100 * s['classifier_test_accuracy']:.1f}%, chance: 10%)\n            {fd_line(s)}",
                f"grid (one row per class, in the order of prompts{self.tag}.txt): {s['grid']}")

    asked = "prompted"


TASK = PromptedClasses("text", "demo", "text-conditional UNet on the cache, frozen MiniLM, CFG dropout 0.1 "
                       "(paper §3.3)", "", text=True, prompts=PROMPTS)
