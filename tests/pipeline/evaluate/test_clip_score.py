"""CLIP score (pipeline/evaluate/clip_score.py) against transformers' own CLIP forward on a tiny random CLIP
(torchmetrics 1.9's CLIPScore cannot run on transformers 5: it calls .norm on the ModelOutput that get_*_features
now return)."""
import pytest
import torch

from pipeline.evaluate.clip_score import ClipScore
from pipeline.evaluate.scores import to_uint8
from sd_models import tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def test_clip_score_equals_clips_own_forward_on_the_same_images_and_captions(clip_dir):
    from transformers import CLIPModel, CLIPProcessor
    images = torch.rand(6, 3, 48, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = ["a bag", "a red shoe", "a dress", "a coat", "a bag", "an ankle boot"]
    ours = ClipScore(str(clip_dir), batch_size=4)  # two batches
    got = ours.score(images, captions)
    model, proc = CLIPModel.from_pretrained(str(clip_dir)).eval(), CLIPProcessor.from_pretrained(str(clip_dir))
    with torch.no_grad():  # the full forward: its image_embeds and text_embeds are projected and normalised
        out = model(**proc(text=captions, images=list(to_uint8(images)), return_tensors="pt", padding=True))
    direct = (out.image_embeds * out.text_embeds).sum(-1)
    torch.testing.assert_close(ours.cosines(images, captions), direct, atol=1e-5, rtol=1e-5)
    assert got["clip_score"] == pytest.approx(direct.double().mean().item(), abs=1e-6)
    assert got["clip_score_x100"] == pytest.approx(max(100 * direct.double().mean().item(), 0.0), abs=1e-4)
    assert not torch.allclose(direct, direct[0].expand(6))  # per image, not one constant


def test_missing_captions_and_openclip_files_are_refused_with_the_fix(clip_dir, tmp_path):
    with pytest.raises(ValueError, match="one non-empty caption per image"):
        ClipScore(str(clip_dir)).score(torch.zeros(2, 3, 32, 32), ["a bag", ""])
    weights = tmp_path / "open_clip_pytorch_model.bin"
    weights.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        ClipScore(str(weights))
