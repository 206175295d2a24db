"""The default task: text-to-image (paper §3.3) on Fashion-MNIST captions with the frozen MiniLM, judged by whether
the classifier sees the prompted class in each sample."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.data.make_shards import FASHION_CLASSES, FASHION_PHRASES
from pipeline.demo.judging import held_out_scores, quantised
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

    headline_format = ("class agreement {prompt_class_agreement:.1%}", "chance 10%")
    report_format = ("agreement {prompt_class_agreement:.0%} between the {asked} class and the classifier\n"
                     "            ({per_class}; the judge on real test images: {classifier_test_accuracy:.1%}, chance: "
                     "10%)\n            {fd_line}",
                     "grid (one row per class, in the order of prompts{tag}.txt): {grid}")
    asked = "prompted"

    def values(self, s: dict) -> dict:
        return {"asked": self.asked, "tag": self.tag,
                "per_class": ", ".join(f"{k} {v:.0%}" for k, v in s["per_class_agreement"].items())}



TASK = PromptedClasses("text", "demo", "text-conditional UNet on the cache, frozen MiniLM, CFG dropout 0.1 "
                       "(paper §3.3)", "", text=True, prompts=PROMPTS)
