"""Tiny random Stable Diffusion models built with diffusers and saved as diffusers folders (nothing downloaded): an
SD 1.x, an SD 2.x and an SDXL of the real structure at a few channels, with a CLIP tokenizer built from a hand-written
byte-level vocabulary."""
import json
from pathlib import Path

import torch

SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def clip_tokenizer(folder: Path, pad: str = "<|endoftext|>") -> Path:
    """A CLIPTokenizer folder with every byte as a token (and as a word's last token), no merges: captions
    tokenize letter by letter, as a real CLIP tokenizer would tokenize rare words."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + list(SPECIAL))}
    folder.mkdir(parents=True, exist_ok=True)
    CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad, model_max_length=16).save_pretrained(str(folder))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return folder


def clip_text(tokenizer_dir: Path, hidden: int, layers: int, projection: int = 0, act: str = "quick_gelu",
              pad: str = "<|endoftext|>"):
    """A random CLIP text encoder over the tokenizer's vocabulary (64-wide heads, as every SD text encoder has)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         max_position_embeddings=16, hidden_act=act, bos_token_id=vocab[SPECIAL[0]],
                         eos_token_id=vocab[SPECIAL[1]], pad_token_id=vocab[pad],
                         **({"projection_dim": projection} if projection else {}))
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return module


def tiny_sd(family: str, folder: Path, seed: int = 0) -> Path:
    """A tiny random `family` (sd1, sd2 or sdxl) diffusers folder at `folder`: 16x16 images, a f=2 first stage."""
    import diffusers
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=[32, 64],
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                  layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=16,
                                  scaling_factor=0.5)
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                    prediction_type="v_prediction" if family == "sd2" else "epsilon")
    tok = clip_tokenizer(folder / "_tok", pad="!" if family == "sd2" else "<|endoftext|>")
    unet_kw = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=32)
    if family == "sd1":
        text = clip_text(tok, 32, 2)
        unet = diffusers.UNet2DConditionModel(**unet_kw, block_out_channels=[32, 64], attention_head_dim=8,
                                              down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                              up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                                              cross_attention_dim=32)
    elif family == "sd2":
        text = clip_text(tok, 64, 2, act="gelu", pad="!")
        unet = diffusers.UNet2DConditionModel(**unet_kw, block_out_channels=[64, 128], attention_head_dim=[1, 2],
                                              down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                              up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                                              cross_attention_dim=64, use_linear_projection=True, upcast_attention=True)
    else:
        tok2 = clip_tokenizer(folder / "_tok2", pad="!")
        text, text2 = clip_text(tok, 32, 2), clip_text(tok2, 64, 3, projection=32, act="gelu", pad="!")
        unet = diffusers.UNet2DConditionModel(**unet_kw, block_out_channels=[64, 128], attention_head_dim=[1, 2],
                                              down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                                              up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                                              transformer_layers_per_block=[1, 2], cross_attention_dim=96,
                                              use_linear_projection=True, addition_embed_type="text_time",
                                              addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 48)
    for i, m in enumerate((vae, unet, text) + ((text2,) if family == "sdxl" else ())):
        perturbed(m, seed + i)
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(str(tok))
    if family == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text2,
                                                   tokenizer=tokenizer, unet=unet, scheduler=sched,
                                                   tokenizer_2=CLIPTokenizer.from_pretrained(str(tok2)),
                                                   force_zeros_for_empty_prompt=True)
    else:
        pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                                 scheduler=sched, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random CLIPModel (text and vision towers, 32x32 images) with its tokenizer and image processor, saved as a
    transformers folder: a stand-in for a real CLIP in CLIP-score tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    tok = clip_tokenizer(folder / "tokenizer")
    vocab = json.loads((tok / "vocab.json").read_text())
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=vocab[SPECIAL[0]],
                eos_token_id=vocab[SPECIAL[1]], pad_token_id=vocab[SPECIAL[1]])
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(str(folder))
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=CLIPTokenizer.from_pretrained(str(tok))).save_pretrained(str(folder))
    return folder
