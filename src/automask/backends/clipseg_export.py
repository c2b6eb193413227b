"""Export a CLIPSeg checkpoint to the ONNX artifacts that `clipseg_onnx` runs without torch.

Needs torch, transformers, onnx and onnxruntime (`pip install "automask[export]"`). Uses torch's TorchScript
exporter (`dynamo=False`), which needs no extra package. Two graphs, so that an image is encoded once and each
extra prompt pays only for the text encoder and the light decoder:

- image.onnx:  pixel_values 1×3×S×S float32 -> hidden_states K×1×T×D float32, the outputs of vision layers
               `extract_layers` (T = 1 + (S/patch)²). The graph stops at the deepest of them: layers after it
               only feed the pooled output, which segmentation never reads.
- prompt.onnx: hidden_states, input_ids N×L int64, attention_mask N×L int64 -> logits N×S×S float32
               (text encoder + projection, then the decoder with the image broadcast over the N prompts).

Position embeddings are interpolated to S once, at export time, exactly as transformers does at run time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from automask.backends.clipseg import read_preprocessing
from automask.backends.clipseg_common import FORMAT, MANIFEST, fingerprint, onnx_dir
from automask.backends.torch_loading import load_tokenizer
from automask.errors import AutomaskError, ModelNotAvailableError, require
from automask.staging import recover, replace_dir, staging

OPSET = 17
EXPORT_TOLERANCE = 1e-4
"""Largest |ONNX - torch| logit difference accepted by the self-check after export, relative to
max(1, largest |logit|) (fp32 rounding grows with the logits' scale; random weights give logits in the 1000s)."""


def export(model_path: Path, *, int8: bool = False, weight_type: str = "QInt8") -> Path:
    """Write `<model_path>/onnx/` (replacing an older export atomically); return that folder.

    `int8` also writes dynamically quantized copies (`*.int8.onnx`, MatMul weights as `weight_type`).
    Raises `ModelNotAvailableError` when `model_path` holds no loadable CLIPSeg checkpoint, and
    `AutomaskError` when the exported graphs disagree with torch (the export is then not installed).
    """
    for module in ("torch", "transformers", "onnx", "onnxruntime"):
        require(module, "export")
    model_path = Path(model_path)
    model, tokenizer = _load(model_path)
    size = read_preprocessing(model_path).size
    recover(onnx_dir(model_path))  # an export killed inside its swap (SIGKILL) left the last one moved aside
    with contextlib.ExitStack() as stack:
        try:  # locked while it lasts: `recover` leaves what its `replace_dir` moves aside alone
            tmp = stack.enter_context(staging(onnx_dir(model_path)))
        except ModelNotAvailableError as exc:
            raise AutomaskError(
                f"Cannot write the ONNX export into '{model_path}' ({exc.__cause__}). Copy the model folder "
                "somewhere writable and export that copy."
            ) from exc.__cause__
        _export_into(tmp, model_path, model, tokenizer, size, int8, weight_type)
    return onnx_dir(model_path)


def _export_into(
    tmp: Path, model_path: Path, model: Any, tokenizer: Any, size: tuple[int, int], int8: bool, weight_type: str
) -> None:
    """`export`'s work: the graphs written into staging folder `tmp`, checked, then swapped into place."""
    try:
        pixels, ids, mask = _example_inputs(tokenizer, size)
        _export_image(model, size, pixels, tmp / "image.onnx")
        hidden = _run(tmp / "image.onnx", {"pixel_values": pixels})[0]
        _export_prompt(model, hidden, ids, mask, tmp / "prompt.onnx")
        _check(model, tokenizer, tmp, pixels)
        manifest = _manifest(model, tokenizer, size, model_path)
        tokenizer.backend_tokenizer.save(str(tmp / manifest["tokenizer"]["file"]))
        if int8:
            manifest["int8_files"] = quantize(tmp, weight_type)
            manifest["int8_weight_type"] = weight_type
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        replace_dir(tmp, onnx_dir(model_path))
    except Exception as exc:
        error = _failure(exc, tmp, model_path)
        if error is None:
            raise
        raise error from exc


def _failure(exc: Exception, tmp: Path, model_path: Path) -> AutomaskError | None:
    """The error to show for `exc`, raised while exporting `model_path` into staging folder `tmp`; None when `exc`
    itself says it best."""
    if not tmp.is_dir():  # gone with the folder: ONNX Runtime and tokenizers raise their own errors for its files
        return AutomaskError(
            f"'{model_path}' was replaced while it was being exported (by a models pull --force, most likely): "
            "nothing was installed. Export again once the pull is over: automask models export NAME_OR_PATH "
            "(a pull exports the graphs itself when it can)."
        )
    if isinstance(exc, OSError):  # a full disk, mostly: the export is the size of the weights (twice with int8)
        return AutomaskError(
            f"Cannot write the ONNX export into '{model_path}' ({exc.strerror or exc}). Free some space there "
            "and run again: automask models export NAME_OR_PATH (the model still runs with torch meanwhile)."
        )
    return None


def quantize(folder: Path, weight_type: str = "QInt8") -> dict[str, str]:
    """Write `<graph>.int8.onnx` next to each fp32 graph in `folder`; return {graph: file name}.

    Dynamic quantization: MatMul/Gemm weights become int8 per output channel, activations are quantized on the
    fly. The decoder stays fp32: it is cheap, and quantizing its 64-wide layers costs the most accuracy.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    files = {}
    quiet = _DropMessage("pre-processing before quantization")  # advice for static quantization, not ours
    logging.getLogger().addFilter(quiet)
    try:
        for graph in ("image", "prompt"):
            source, name = folder / f"{graph}.onnx", f"{graph}.int8.onnx"
            nodes = onnx.load(str(source), load_external_data=False).graph.node
            quantize_dynamic(
                source,
                folder / name,
                weight_type=QuantType[weight_type],
                per_channel=True,
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_exclude=[n.name for n in nodes if n.name.startswith("/decoder/")],
                extra_options={"MatMulConstBOnly": True},
            )
            files[graph] = name
    finally:
        logging.getLogger().removeFilter(quiet)
    return files


class _DropMessage(logging.Filter):
    """Drops log records whose message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _load(model_path: Path) -> tuple[Any, Any]:
    """The checkpoint as an fp32 CPU model in eval mode (eager attention: the plainest graph) + its tokenizer."""
    from transformers import CLIPSegForImageSegmentation

    try:
        model = CLIPSegForImageSegmentation.from_pretrained(str(model_path), attn_implementation="eager")
        tokenizer = load_tokenizer(model_path, "CLIPSeg", pull="clipseg")
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotAvailableError(
            f"'{model_path}' holds no CLIPSeg checkpoint that can be exported ({exc}). "
            "Point at a folder saved with save_pretrained, or pull one: automask models pull clipseg"
        ) from exc
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ModelNotAvailableError(f"The tokenizer of '{model_path}' has no tokenizers backend to export.")
    return model.float().eval(), tokenizer


def _example_inputs(tokenizer: Any, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trace inputs: a random 1×3×S×S image and two prompts of different lengths (N×L int64)."""
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((1, 3, *size)).astype(np.float32)
    enc = tokenizer(["a photo of a cat", "sofa"], padding=True, return_tensors="np")
    return pixels, enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def _image_graph(model: Any, size: tuple[int, int]) -> Any:
    """A torch module: pixel_values 1×3×S×S -> K×1×T×D hidden states of the vision layers `extract_layers`."""
    import torch

    vision = model.clip.vision_model
    extract = [int(i) for i in model.config.extract_layers]

    class ImageGraph(torch.nn.Module):
        position: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.embeddings = vision.embeddings
            self.pre_layrnorm = vision.pre_layrnorm
            self.layers = torch.nn.ModuleList(vision.encoder.layers[: max(extract) + 1])
            patch, dim = vision.config.patch_size, vision.config.hidden_size
            tokens = 1 + (size[0] // patch) * (size[1] // patch)
            with torch.no_grad():
                pos = vision.embeddings.interpolate_pos_encoding(torch.zeros(1, tokens, dim), size[0], size[1])
            self.register_buffer("position", pos.detach().clone())

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            x = self.embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
            cls = self.embeddings.class_embedding.expand(x.shape[0], 1, -1)
            x = self.pre_layrnorm(torch.cat([cls, x], dim=1) + self.position)
            kept = {}
            for i, layer in enumerate(self.layers):
                x = layer(x, None)
                kept[i] = x
            return torch.stack([kept[i] for i in extract])

    return ImageGraph().eval()


def _prompt_graph(model: Any) -> Any:
    """A torch module: (K×1×T×D hidden states, N×L ids, N×L mask) -> N×S×S decoder logits."""
    import torch

    class PromptGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = model.clip
            self.decoder = model.decoder

        def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            text = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            # The image (batch 1) broadcasts over the N prompts inside the decoder (FiLM, then residual adds).
            return self.decoder(list(hidden.unbind(0)), text.pooler_output).logits

    return PromptGraph().eval()


def _export_image(model: Any, size: tuple[int, int], pixels: np.ndarray, out: Path) -> None:
    import torch

    with torch.no_grad(), _tracer_warnings_off():
        torch.onnx.export(
            _image_graph(model, size),
            (torch.from_numpy(pixels),),
            str(out),
            dynamo=False,
            opset_version=OPSET,
            input_names=["pixel_values"],
            output_names=["hidden_states"],
        )


def _export_prompt(model: Any, hidden: np.ndarray, ids: np.ndarray, mask: np.ndarray, out: Path) -> None:
    import torch

    prompts_axes = {0: "prompts", 1: "tokens"}
    with torch.no_grad(), _tracer_warnings_off():
        torch.onnx.export(
            _prompt_graph(model),
            (torch.from_numpy(hidden), torch.from_numpy(ids), torch.from_numpy(mask)),
            str(out),
            dynamo=False,
            opset_version=OPSET,
            input_names=["hidden_states", "input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={"input_ids": prompts_axes, "attention_mask": prompts_axes, "logits": {0: "prompts"}},
        )


@contextlib.contextmanager
def _tracer_warnings_off() -> Iterator[None]:
    """Silence the tracer's warnings. They flag values frozen into the graph: the image size (fixed), the
    'sequence longer than 77' and padding checks (false for every tokenised input) and non-negative indices;
    `_check` compares the graphs with torch on prompts of other counts and lengths after every export."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


CHECK_PROMPTS = (["sofa"], ["a lamp", "the red sofa by the window", "x"])
"""Prompt sets the self-check runs: other counts and lengths than the trace inputs."""


def _check(model: Any, tokenizer: Any, folder: Path, pixels: np.ndarray) -> None:
    """Compare the exported graphs with the torch model on `CHECK_PROMPTS`; raise `AutomaskError` if they differ."""
    import torch

    hidden = _run(folder / "image.onnx", {"pixel_values": pixels})[0]
    for prompts in CHECK_PROMPTS:
        enc = tokenizer(prompts, padding=True, return_tensors="np")
        feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
        got = _run(folder / "prompt.onnx", {"hidden_states": hidden, **feeds})[0]
        with torch.no_grad():
            ref = model(
                pixel_values=torch.from_numpy(pixels).expand(len(prompts), -1, -1, -1),
                **{k: torch.from_numpy(v) for k, v in feeds.items()},
            ).logits.reshape(got.shape)
        err = float(np.abs(got - ref.numpy()).max() / max(1.0, float(np.abs(ref.numpy()).max())))
        if not err <= EXPORT_TOLERANCE:
            raise AutomaskError(
                f"The ONNX export disagrees with torch (relative logit difference {err:.2g} > {EXPORT_TOLERANCE}); "
                "it was not installed. Please report this with your torch and transformers versions."
            )


def _manifest(model: Any, tokenizer: Any, size: tuple[int, int], model_path: Path) -> dict[str, Any]:
    import torch
    import transformers

    max_length = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))
    return {
        "format": FORMAT,
        "architecture": "clipseg",
        "image_size": list(size),
        "extract_layers": [int(i) for i in model.config.extract_layers],
        "files": {"image": "image.onnx", "prompt": "prompt.onnx"},
        "tokenizer": {
            "file": "tokenizer.json",
            "pad_id": int(tokenizer.pad_token_id),
            "pad_token": str(tokenizer.pad_token),
            "max_length": max_length,
        },
        "fingerprint": fingerprint(model_path),
        "exported_with": {"torch": torch.__version__, "transformers": transformers.__version__, "opset": OPSET},
    }
