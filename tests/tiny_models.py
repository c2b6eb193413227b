"""Tiny random models built from configs, saved with `save_pretrained` (no network).

Loaded back through automask's real loading code, exactly like a downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path


def byte_level_vocab() -> dict[str, int]:
    """A CLIP-style byte-level BPE vocabulary with no merges: every byte, with and without '</w>'."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab: dict[str, int] = {}
    for tok in [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(tok, len(vocab))
    return vocab


def make_tiny_clipseg(folder: Path, seed: int = 0, image_size: int = 64, vision_layers: int = 3) -> Path:
    """Save a tiny random CLIPSeg (hidden 32, 2 layers...) with its processor into `folder`; return it.

    The decoder reads vision layers (1, 2) of `vision_layers` (>= 3); image_size 64, patch 16; the text vocab
    is byte level.
    """
    import torch
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
        ViTImageProcessor,
    )

    vocab = byte_level_vocab()
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": 16,
    }
    config = CLIPSegConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=32,
        reduce_dim=16,
        extract_layers=[1, 2],
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        conditional_layer=0,
    )
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    image_processor = ViTImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
