"""Text-to-image (paper §3.3, §4.3.1): tau(y) of a caption, cross-attended by the UNet. Either a frozen pretrained
encoder (its embeddings cached with the latents, or computed from the cached tokens) or the paper's transformer over
BERT tokens, trained with the UNet. The null condition is the empty caption."""
from __future__ import annotations

from ldm.kinds.base import CacheMismatch, Input, Kind, register
from ldm.kinds.common import apply_drop
from ldm.kinds.inputs import read_text


def check_embeddings(cfg, text: dict, cache: str) -> None:
    """Embeddings cached with the latents must come from the layer, and the padding rule, the config asks for."""
    c = cfg.conditioning
    if not text.get("embeddings") or c.text_encoder != "hf":
        return
    have = (text.get("layer", "last"), text.get("mask_padding", True))
    if have != (c.text_layer, c.mask_padding):
        raise CacheMismatch(f"the cache {cache} holds text embeddings of the {have[0]} layer with mask_padding="
                            f"{have[1]}, but the config asks for conditioning.text_layer={c.text_layer} and "
                            f"conditioning.mask_padding={c.mask_padding}: set those, or re-encode")


class Text(Kind):
    name = "text"
    inputs = (Input("prompt", "--prompt", read_text, "a caption (repeatable)", "TEXT"),)
    sample_columns = ("caption",)

    def validate(self, cfg) -> None:
        from ldm.config import ConfigError
        c, un = cfg.conditioning, cfg.unet
        if un.context_dim is None:
            raise ConfigError("conditioning.kind='text' needs unet.context_dim (the text encoder's width)")
        if c.text_encoder == "transformer" and un.context_dim != c.n_embed:
            raise ConfigError(f"unet.context_dim={un.context_dim} must equal conditioning.n_embed={c.n_embed}")

    def check_cache(self, cfg, manifest: dict, cache: str) -> None:
        text, c = manifest.get("text_encoder", {}), cfg.conditioning
        if text.get("kind") != "hf":
            raise CacheMismatch(f"the config is text-conditional but the cache {cache} holds no caption tokens "
                                f"(encoded with --text-encoder none)")
        if c.text_encoder == "hf" and text.get("dim") != cfg.unet.context_dim:
            raise CacheMismatch(f"cache text encoder width {text.get('dim')} != unet.context_dim "
                                f"{cfg.unet.context_dim}; set unet.context_dim={text.get('dim')}")
        if text.get("max_length") != c.max_length:
            raise CacheMismatch(f"cache tokens have length {text.get('max_length')} but conditioning.max_length="
                                f"{c.max_length}; set conditioning.max_length={text.get('max_length')}")
        check_embeddings(cfg, text, cache)

    def columns(self, cfg, cached_emb: bool) -> tuple[str, ...]:
        return ("input_ids", "attention_mask") + (("text_emb",) if cached_emb else ())

    def cond_stage(self, cfg):
        c = cfg.conditioning
        if c.text_encoder != "transformer":
            return None
        from ldm.text_encoders import TransformerTextEncoder
        return TransformerTextEncoder(c.vocab_size, c.max_length, c.n_embed, c.n_layer, c.n_head, c.text_encoder_path)

    def frozen_encoder(self, cfg, path, device):
        if cfg.text_encoder != "hf":
            return None
        from ldm.text_encoders import FrozenHFTextEncoder
        return FrozenHFTextEncoder(path or cfg.text_encoder_path, cfg.max_length, cfg.text_layer,
                                   cfg.mask_padding).to(device)

    def setup(self, c) -> None:
        if c.cfg.text_encoder == "transformer":
            if c.tokenize is None:
                raise ValueError("the trainable transformer conditioning needs the model's tokenizer")
        elif c.text is None:
            raise ValueError("a frozen-text-encoder conditioning needs its FrozenHFTextEncoder")
        c.null = self._encode(c, [""])

    def _encode(self, c, captions: list) -> dict:
        captions = [str(p) for p in captions]
        if c.cfg.text_encoder == "transformer":  # token ids in; tau_theta runs inside LatentDiffusion (eq. 3)
            ids, mask = c.tokenize(captions)
            return {"tokens": ids.to(c.device), "mask": mask.to(c.device)}
        emb, mask = c.text(captions)
        return masked(c, {"context": emb.to(c.device)}, mask.to(c.device))

    def batch(self, c, batch, drop, generator):
        dev, n = c.device, drop.shape[0]
        mask = apply_drop(batch["attention_mask"].to(dev).long(), c.null["mask"], drop) if "mask" in c.null else None
        if c.cfg.text_encoder == "transformer":
            return {"tokens": apply_drop(batch["input_ids"].to(dev).long(), c.null["tokens"], drop), "mask": mask}
        if "text_emb" in batch:  # embeddings cached with the latents
            context = batch["text_emb"].to(dev).float().view(n, c.cfg.max_length, -1)
        else:
            context = c.text.encode(batch["input_ids"].to(dev).long(), batch["attention_mask"].to(dev).long())
        return masked(c, {"context": apply_drop(context, c.null["context"], drop)}, mask)

    def prompts(self, c, prompts):
        return self._encode(c, prompts), {k: v.expand(len(prompts), *v.shape[1:]) for k, v in c.null.items()}

    def sample_prompts(self, cfg, rows, side):
        return distinct_captions(rows)

    def held_out(self, cfg, held) -> list:
        return list(held.captions)


def distinct_captions(rows, n: int = 8) -> list[str]:
    """The first n distinct non-empty captions of the rows (the sample grid's prompts), or one empty prompt."""
    seen: list[str] = []
    for r in rows:
        if r["caption"] and r["caption"] not in seen:
            seen.append(r["caption"])
    return seen[:n] or [""]


def masked(c, cond: dict, mask):
    """The condition with its tokens' mask for the cross-attention (conditioning.mask_padding), or without: every
    position attended to, as Stable Diffusion does."""
    return {**cond, "mask": mask} if c.cfg.mask_padding and mask is not None else cond


register(Text())
