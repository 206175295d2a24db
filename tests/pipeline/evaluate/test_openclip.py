"""An OpenCLIP checkpoint file as the CLIP-score model (pipeline/evaluate/openclip.py): the mapped CLIPModel's cosines
equal OpenCLIP's own forward, written out below from open_clip's VisionTransformer / text tower over the file's keys
with torch's nn.MultiheadAttention (the module whose packed in_proj the checkpoint stores), on a tiny random file."""
import json

import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluate.clip_score import ClipScore
from pipeline.evaluate.openclip import load_state
from pipeline.evaluate.scores import to_uint8
from sd_models import clip_tokenizer

VW, TW, PATCH, GRID, EMBED, CONTEXT = 64, 64, 8, 4, 16, 16


def random_openclip(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in OpenCLIP's ViT layout (2 vision and 2 text blocks, MLP ratio 4)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def blocks(prefix, w):
        out = {}
        for i in range(2):
            p = f"{prefix}.{i}."
            out.update({p + "ln_1.weight": 1 + r(w), p + "ln_1.bias": r(w), p + "ln_2.weight": 1 + r(w),
                        p + "ln_2.bias": r(w), p + "attn.in_proj_weight": r(3 * w, w),
                        p + "attn.in_proj_bias": r(3 * w),
                        p + "attn.out_proj.weight": r(w, w), p + "attn.out_proj.bias": r(w),
                        p + "mlp.c_fc.weight": r(4 * w, w), p + "mlp.c_fc.bias": r(4 * w),
                        p + "mlp.c_proj.weight": r(w, 4 * w), p + "mlp.c_proj.bias": r(w)})
        return out

    state = {"visual.conv1.weight": r(VW, 3, PATCH, PATCH), "visual.class_embedding": r(VW),
             "visual.positional_embedding": r(GRID * GRID + 1, VW), "visual.ln_pre.weight": 1 + r(VW),
             "visual.ln_pre.bias": r(VW), "visual.ln_post.weight": 1 + r(VW), "visual.ln_post.bias": r(VW),
             "visual.proj": r(VW, EMBED), "token_embedding.weight": r(vocab, TW),
             "positional_embedding": r(CONTEXT, TW), "ln_final.weight": 1 + r(TW), "ln_final.bias": r(TW),
             "text_projection": r(TW, EMBED), "logit_scale": torch.tensor(4.6),
             "attn_mask": torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)}
    return {**state, **blocks("visual.transformer.resblocks", VW), **blocks("transformer.resblocks", TW)}


def _blocks(x, sd, prefix, heads, act, mask=None):
    w = x.shape[-1]
    for i in range(2):
        p = f"{prefix}.{i}."
        attn = torch.nn.MultiheadAttention(w, heads, batch_first=True)
        attn.load_state_dict({"in_proj_weight": sd[p + "attn.in_proj_weight"],
                              "in_proj_bias": sd[p + "attn.in_proj_bias"],
                              "out_proj.weight": sd[p + "attn.out_proj.weight"],
                              "out_proj.bias": sd[p + "attn.out_proj.bias"]})
        h = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        x = x + F.linear(act(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                         sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x


@torch.no_grad()
def openclip_cosines(sd, pixels, tokens, vision_heads, text_heads, act=F.gelu):
    """OpenCLIP's encode_image / encode_text, normalised, and their cosine per pair."""
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, VW), x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (VW,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _blocks(x, sd, "visual.transformer.resblocks", vision_heads, act)
    img = F.layer_norm(x, (VW,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])[:, 0] @ sd["visual.proj"]
    t = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][:tokens.shape[1]]
    mask = torch.full((tokens.shape[1],) * 2, float("-inf")).triu(1)
    t = _blocks(t, sd, "transformer.resblocks", text_heads, act, mask)
    t = F.layer_norm(t, (TW,), sd["ln_final.weight"], sd["ln_final.bias"])
    txt = t[torch.arange(len(t)), tokens.argmax(-1)] @ sd["text_projection"]  # the end-of-text token: the largest id
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


IMAGES = torch.rand(5, 3, 40, 36, generator=torch.Generator().manual_seed(1)) * 2 - 1
CAPTIONS = ["a bag", "a red shoe", "an ankle boot next to a coat", "a dress", "a bag"]


def _folder(tmp_path, state, name="open_clip_pytorch_model.bin", config=None):
    tok = clip_tokenizer(tmp_path)
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state, str(tmp_path / name))
    else:
        torch.save(state, str(tmp_path / name))
    if config is not None:
        (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    return tok / name


def _vocab(tmp_path):
    return len(json.loads((clip_tokenizer(tmp_path / "probe") / "vocab.json").read_text()))


def _reference(ours, state, vision_heads, text_heads, act=F.gelu):
    pixels = ours.processor(images=list(to_uint8(IMAGES)), return_tensors="pt")["pixel_values"]
    tokens = ours.processor(text=CAPTIONS, return_tensors="pt", padding=True, truncation=True,
                            max_length=CONTEXT)["input_ids"]
    return openclip_cosines(state, pixels, tokens, vision_heads, text_heads, act)


def test_an_openclip_file_scores_as_openclips_own_forward(tmp_path):
    state = random_openclip(_vocab(tmp_path))
    ours = ClipScore(str(_folder(tmp_path, state)), batch_size=3)  # two batches
    assert ours.model.config.vision_config.num_attention_heads == 1  # 64 wide: open_clip's default head width
    direct = _reference(ours, state, vision_heads=1, text_heads=1)
    torch.testing.assert_close(ours.cosines(IMAGES, CAPTIONS), direct, atol=1e-5, rtol=1e-5)
    assert ours.score(IMAGES, CAPTIONS)["clip_score"] == pytest.approx(direct.double().mean().item(), abs=1e-6)
    assert not torch.allclose(direct, direct[0].expand(5))


def test_open_clip_config_sets_heads_and_quickgelu_and_a_training_checkpoint_loads(tmp_path):
    state = random_openclip(_vocab(tmp_path), seed=2)
    wrapped = {"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}  # open_clip's training format
    cfg = {"model_cfg": {"quick_gelu": True, "vision_cfg": {"head_width": 16}, "text_cfg": {"heads": 4}}}
    ours = ClipScore(str(_folder(tmp_path, wrapped, "epoch_3.pt", config=cfg)))
    assert (ours.model.config.vision_config.num_attention_heads, ours.model.config.text_config.num_attention_heads) \
        == (4, 4)
    direct = _reference(ours, state, 4, 4, act=lambda x: x * torch.sigmoid(1.702 * x))
    torch.testing.assert_close(ours.cosines(IMAGES, CAPTIONS), direct, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(direct, _reference(ours, state, 1, 1, act=lambda x: x * torch.sigmoid(1.702 * x)))


def test_safetensors_loads_and_unknown_layouts_or_a_missing_tokenizer_are_refused(tmp_path):
    state = random_openclip(_vocab(tmp_path))
    path = _folder(tmp_path / "st", state, "open_clip_model.safetensors")
    assert load_state(path).keys() == state.keys()
    ClipScore(str(path)).score(IMAGES, CAPTIONS)
    odd = _folder(tmp_path / "odd", {**state, "visual.transformer.resblocks.0.ln_attn.weight": torch.ones(VW)})
    with pytest.raises(ValueError, match="ln_attn"):
        ClipScore(str(odd))
    headless = {k: v for k, v in state.items() if k != "visual.proj"}
    with pytest.raises(ValueError, match="visual.proj"):
        ClipScore(str(_folder(tmp_path / "headless", headless)))
    lone = tmp_path / "lone" / "open_clip_pytorch_model.bin"
    lone.parent.mkdir()
    torch.save(state, str(lone))
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt"):
        ClipScore(str(lone))
