"""Class-conditional (paper §4.1, Tab. 3): the 10 Fashion-MNIST labels as a learned embedding added to the time
embedding, an 11th index the null class of CFG; judged as the text task is, on the requested class."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ldm.config import ConditioningConfig, LDMConfig, get_preset, register_preset
from pipeline.data.make_shards import FASHION_CLASSES
from pipeline.demo.tasks.text import PromptedClasses


@register_preset("demo-class")
def preset() -> LDMConfig:
    d = get_preset("demo")
    return replace(d, name="demo-class", unet=replace(d.unet, context_dim=None, num_classes=11),
                   conditioning=ConditioningConfig(kind="class", num_classes=10))


@dataclass(frozen=True)
class RequestedClasses(PromptedClasses):
    asked = "requested"

    def row_title(self, prompt) -> str:
        return f"label {prompt} ({FASHION_CLASSES[int(prompt)]})"


# the label embedding learns slower than the text task's MiniLM captions: it trains 25% longer
# (docs/measurements.md, the class task)
TASK = RequestedClasses("class", "demo-class", "class-conditional UNet on the cache, a label embedding, CFG "
                        "dropout 0.1 (paper §4.1)", "-class", prompts=tuple(str(c) for c in range(10)),
                        ldm_steps_factor=1.25)
