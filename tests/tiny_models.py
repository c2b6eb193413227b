"""Tiny random models built from configs, saved with `save_pretrained` (no network).

Loaded back through automask's real loading code, exactly like a downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_random(model_class: Any, config: Any, folder: Path, seed: int) -> None:
    """Build `model_class(config)` with random weights drawn from `seed`; save it into `folder` (created)."""
    import torch

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model_class(config).eval().save_pretrained(folder)


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
    save_random(CLIPSegForImageSegmentation, config, folder, seed)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    image_processor = ViTImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


TINY_BERT_WORDS = (
    *("sofa", "lamp", "cat", "dog", "chair", "chairs", "person", "cup", "table", "tree", "car", "red", "the"),
    *("a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s", "t"),
    *("u", "v", "w", "x", "y", "z", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ",", "-"),
)


def tiny_bert_vocab() -> dict[str, int]:
    """A WordPiece vocabulary laid out like bert-base-uncased where GroundingDINO hard-codes ids:
    [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, '.'=1012, '?'=1029. Any lower-case ASCII word
    tokenizes (single letters and their '##' continuations are in it)."""
    fixed = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}
    words = [*TINY_BERT_WORDS, *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789")]
    free = (i for i in range(1100) if i not in fixed)
    vocab = {tok: i for i, tok in fixed.items()}
    vocab.update({w: next(free) for w in words})
    vocab.update({f"[unused{i}]": i for i in free})
    return vocab


def make_tiny_grounding_dino(folder: Path, seed: int = 0, num_queries: int = 30, image_size: int = 64) -> Path:
    """Save a tiny random GroundingDINO (d_model 32, 1+2 layers, tiny Swin and BERT) with its processor.

    Shapes follow transformers' own tests (tests/models/grounding_dino/test_modeling_grounding_dino.py); the
    image processor resizes the shortest edge to `image_size` (longest at most 1.5×).
    """
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    vocab = tiny_bert_vocab()
    swin = SwinConfig(
        window_size=7,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        image_size=image_size,
        out_indices=[2, 3, 4],
    )
    text = {
        "model_type": "bert",
        "vocab_size": len(vocab),
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 16,
        "max_position_embeddings": 64,
    }
    config = GroundingDinoConfig(
        backbone_config=swin,
        text_config=text,
        d_model=64,  # GroupNorm(32, d_model) on a 1×1 map (any square image's coarsest level) needs 2 channels a group
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=num_queries,
        num_feature_levels=4,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    save_random(GroundingDinoForObjectDetection, config, folder, seed)
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=32)
    size = {"shortest_edge": image_size, "longest_edge": image_size * 3 // 2}
    GroundingDinoProcessor(GroundingDinoImageProcessorPil(size=size), tokenizer).save_pretrained(folder)
    return folder


def make_tiny_sam(folder: Path, seed: int = 0, image_size: int = 64) -> Path:
    """Save a tiny random SAM (ViT hidden 32, 2 layers, patch 8: an 8×8 embedding; 32×32 low-res masks) with its
    processor (longest edge and padding `image_size`) into `folder`; return it."""
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    patch = 8
    vision = {
        "hidden_size": 32,
        "output_channels": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch,
        "window_size": 4,
        "global_attn_indexes": [1],
        "num_pos_feats": 16,
        "mlp_dim": 64,
        "initializer_range": 0.02,
    }
    prompt = {"hidden_size": 32, "image_size": image_size, "patch_size": patch, "mask_input_channels": 4}
    decoder = {
        "hidden_size": 32,
        "mlp_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "iou_head_hidden_dim": 32,
    }
    config = SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    save_random(SamModel, config, folder, seed)
    processor = SamImageProcessorPil(
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": image_size // 4},
        mask_pad_size={"height": image_size // 4, "width": image_size // 4},
    )
    SamProcessor(processor).save_pretrained(folder)
    return folder


def make_tiny_grounded_sam(folder: Path, seed: int = 0, num_queries: int = 30) -> Path:
    """A local grounded-sam folder as `automask models pull grounded-sam` lays it out: one subfolder per
    hub repository (GroundingDINO, SAM), no automask.json (found by the subfolders' config.json)."""
    make_tiny_grounding_dino(folder / "IDEA-Research--grounding-dino-tiny", seed=seed, num_queries=num_queries)
    make_tiny_sam(folder / "facebook--sam-vit-base", seed=seed)
    return folder


def _write_image_processor(folder: Path, kind: str, size: int, mean: list[float], std: list[float]) -> None:
    """A preprocessor_config.json as the hub's SAM 2 / SAM 3 checkpoints ship it (their image processors need
    torchvision, so they cannot be saved from an instance here)."""
    import json

    config = {
        "image_processor_type": kind,
        "do_resize": True,
        "size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
        "do_convert_rgb": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def make_tiny_sam3(folder: Path, seed: int = 0, image_size: int = 112, num_queries: int = 12) -> Path:
    """Save a tiny random SAM 3 (ViT hidden 32, 2 layers, patch 14: an 8×8 grid; FPN scales 4, 2, 1, 0.5; 32×32
    masks; CLIP text hidden 32 with a byte-level vocabulary, 32 positions) with its tokenizer and a processor config
    (`image_size` square, mean/std 0.5) into `folder`; return it. Shapes follow transformers' own tests
    (tests/models/sam3/test_modeling_sam3.py)."""
    from transformers import CLIPTokenizer, Sam3Config, Sam3Model

    vocab = byte_level_vocab()
    backbone = {
        "model_type": "sam3_vit_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": 14,
        "window_size": 4,
        "global_attn_indexes": [1],
        "pretrain_image_size": image_size,
    }
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 64,
        "projection_dim": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 32,
        "hidden_act": "gelu",
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    small = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
    config = Sam3Config(
        vision_config={"backbone_config": backbone, "fpn_hidden_size": 32, "scale_factors": [4.0, 2.0, 1.0, 0.5]},
        text_config={"model_type": "clip_text_model", **text},
        geometry_encoder_config={**small, "num_layers": 1},
        detr_encoder_config={**small, "num_layers": 1},
        detr_decoder_config={**small, "num_layers": 2, "num_queries": num_queries},
        mask_decoder_config={"hidden_size": 32, "num_attention_heads": 4, "num_upsampling_stages": 3},
    )
    save_random(Sam3Model, config, folder, seed)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32).save_pretrained(folder)
    _write_image_processor(folder, "Sam3ImageProcessor", image_size, [0.5] * 3, [0.5] * 3)
    return folder


def make_tiny_edgetam(folder: Path, seed: int = 0, image_size: int = 128) -> Path:
    """Save a tiny random EdgeTAM (RepViT widths 12/24/48/96, depth 1 per stage; FPN 32; decoder hidden 32) with a
    processor config (`image_size` square, ImageNet mean/std) into `folder`; return it. Shapes follow transformers'
    own tests (tests/models/edgetam/test_modeling_edgetam.py); the backbone is automask's RepViT (timm's layout)."""
    from transformers import EdgeTamConfig, EdgeTamModel, TimmWrapperConfig

    from automask.backends.repvit import repvit_backbones

    channels = [96, 48, 24, 12]
    grid = image_size // 4
    backbone = TimmWrapperConfig(
        architecture="repvit_m1.dist_in1k",
        model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3],
                    "embed_dim": channels[::-1], "depth": [1, 1, 1, 1]},
    )  # fmt: skip
    vision = {
        "backbone_config": backbone,
        "backbone_channel_list": channels,
        "backbone_feature_sizes": [[grid, grid], [grid // 2, grid // 2], [grid // 4, grid // 4]],
        "fpn_hidden_size": 32,
    }
    prompt = {"hidden_size": 32, "image_size": image_size, "patch_size": 16, "mask_input_channels": 8}
    decoder = {"hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "iou_head_hidden_dim": 32}  # fmt: skip
    config = EdgeTamConfig(
        vision_config={"model_type": "edgetam_vision_model", **vision},
        prompt_encoder_config=prompt,
        mask_decoder_config=decoder,
    )
    with repvit_backbones():
        save_random(EdgeTamModel, config, folder, seed)
    _write_image_processor(folder, "Sam2ImageProcessor", image_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return folder


def make_tiny_sam2(folder: Path, seed: int = 0, image_size: int = 128, video: bool = False) -> Path:
    """Save a tiny random SAM 2 (Hiera hidden 12, widths 12/24/48/96, blocks 1/1/2/1; FPN 32; decoder hidden 32) with
    a processor config (`image_size` square, ImageNet mean/std) into `folder`; return it. Shapes follow transformers'
    own tests (tests/models/sam2/test_modeling_sam2.py). `video`: saved as `Sam2VideoModel` (config.json 'sam2_video',
    the memory modules' weights too), as the hub's facebook/sam2.1-hiera-* checkpoints are."""
    from transformers import Sam2Config, Sam2Model, Sam2VideoConfig, Sam2VideoModel

    grid = image_size // 4
    backbone = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": 12,
        "embed_dim_per_stage": [12, 24, 48, 96],
        "num_attention_heads_per_stage": [1, 2, 4, 8],
        "blocks_per_stage": [1, 1, 2, 1],
        "global_attention_blocks": [3],
        "window_size_per_stage": [8, 4, 4, 4],
        "image_size": [image_size, image_size],
    }
    vision = {
        "model_type": "sam2_vision_model",
        "backbone_config": backbone,
        "backbone_channel_list": [96, 48, 24, 12],
        "backbone_feature_sizes": [[grid, grid], [grid // 2, grid // 2], [grid // 4, grid // 4]],
        "fpn_hidden_size": 32,
    }
    prompt = {"hidden_size": 32, "image_size": image_size, "patch_size": 16, "mask_input_channels": 8}
    decoder = {"hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "iou_head_hidden_dim": 32}  # fmt: skip
    parts = {"vision_config": vision, "prompt_encoder_config": prompt, "mask_decoder_config": decoder}
    if video:
        memory = {"memory_attention_hidden_size": 32, "memory_encoder_hidden_size": 32, "memory_fuser_embed_dim": 32,
                  "mask_downsampler_embed_dim": 32, "memory_attention_num_layers": 1,
                  "memory_attention_feed_forward_hidden_size": 32}  # fmt: skip
        save_random(Sam2VideoModel, Sam2VideoConfig(**parts, image_size=image_size, **memory), folder, seed)
    else:
        save_random(Sam2Model, Sam2Config(**parts), folder, seed)
    _write_image_processor(folder, "Sam2ImageProcessor", image_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return folder
