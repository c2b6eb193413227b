"""The request body (every option of the hosted API, validated once) and the v2 response shapes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from automask.errors import InvalidOptionError
from automask.options import MaskOptions, check_text, parse_prompt, validation_error
from automask.server.bodies import Message, Receive
from automask.server.errors import shown
from automask.server.form_parts import (
    MAX_FORM_PARTS,
    check_not_an_image,
    field_image,
    form_value,
    is_json_object,
    parse_multipart,
)

MAX_MODEL_NAME = 200
MAX_PROMPT_CHARS = 2000
"""Longest prompt the service accepts (text encoders read a few hundred characters per target at most)."""
MAX_PROMPT_TARGETS = 32
"""Most targets one prompt may name: each is scored separately, so this bounds the work of one request."""
MAX_JSON_VALUES = 16_384
"""Most values a JSON body may hold, as counted by `check_json_values`. A request is one flat object of a few
fields, so a body with more values than its text fields could account for (the prompts, the model name, an image
URL) is refused before it is parsed: 40 MB of `[{},{},...]` would parse into 2 GB of objects."""
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class MaskRequest(MaskOptions):
    """`POST /v1|v2/automatic-mask-generator`: the image, the prompt, every `MaskOptions` field (the automask
    extensions negative_prompt, fill_holes, min_area, feather among them: all optional), `base64`, and the automask
    extensions `model` and `instance_masks`. Order of operations: score -> threshold -> negative_prompt ->
    fill_holes -> min_area -> grow_mask -> invert_mask -> feather -> render."""

    image: str | bytes = Field(
        description="An http(s) URL, a bare base64 string or a data:image/...;base64, URI "
        "(or, in a multipart body, the image file itself)."
    )
    prompt: str = Field(
        max_length=MAX_PROMPT_CHARS,
        description=f"What to select; several targets (at most {MAX_PROMPT_TARGETS}) separated by ',' or ' . ' "
        "(or written GroundingDINO-style, 'sofa. lamp.') are unioned.",
    )
    negative_prompt: str | None = Field(
        default=None,
        max_length=MAX_PROMPT_CHARS,
        description=MaskOptions.model_fields["negative_prompt"].description,
    )
    base64: bool = Field(default=False, description='true: answer JSON {"image": "<base64 PNG>", ...metadata}.')
    instance_masks: bool = Field(
        default=False,
        description='automask extension (the hosted API has no such field): true adds "instances" to the JSON '
        'answer, one {"label", "score", "box", "area", "mask"} per entry of "detections" (same order), "mask" '
        "being that instance's own mask as a base64 PNG (H×W 8-bit grayscale, 255 = selected; thresholded, "
        "before negative_prompt, fill_holes, min_area, grow_mask, invert_mask and feather). v1 needs base64: "
        "true with it (a PNG body has no room for them: 400 otherwise); v2 carries them in the JSON of "
        "GET /v2/requests/{id} whatever base64 is.",
    )
    model: str | None = Field(
        default=None,
        max_length=MAX_MODEL_NAME,
        description="automask extension (the hosted API has no such field): the name of a model installed on "
        "this server, as GET /v1/models lists them. Absent: the server's default model.",
    )

    @field_validator("image", mode="before")
    @classmethod
    def _image_type(cls, v: Any) -> Any:
        """One message for a wrong type, naming `image` itself (not pydantic's union branches `image.str`...)."""
        if not isinstance(v, (str, bytes)):
            raise ValueError(
                f"must be a string (an http(s) URL, base64 data or a data:image/...;base64, URI), not {_json_type(v)}"
            )
        return v

    @property
    def targets(self) -> list[str]:
        """Every target the request scores, once each: the prompt's, then the negative prompt's."""
        return self.scored_targets(parse_prompt(self.prompt))

    def options(self) -> MaskOptions:
        """The masking options alone."""
        return MaskOptions.parse(self.model_dump(include=set(MaskOptions.model_fields)))

    def stored(self) -> tuple[str, bytes | None]:
        """The request as it is kept until it runs (a v2 job's row, a v1 hand-off in Redis): JSON without the
        fields left at their defaults (a worker of the previous release still reads it), and an uploaded image
        file apart, as bytes (None when the image is a string, kept in the JSON)."""
        upload = self.image if isinstance(self.image, bytes) else None
        return self.model_dump_json(exclude={"image"} if upload is not None else None, exclude_defaults=True), upload

    @staticmethod
    def unstored(body: str | bytes, upload: bytes | None) -> dict[str, Any]:
        """The fields of a `stored()` request, its uploaded image put back (validate with `model_validate`)."""
        data: dict[str, Any] = json.loads(body)
        if upload is not None:
            data["image"] = bytes(upload)
        return data


def validate_request(data: Any, *, strict: bool) -> MaskRequest:
    """Validate a decoded body; raise `InvalidOptionError` naming the first bad field. `strict=False` accepts
    strings such as "0.3" or "true" (form fields)."""
    if not isinstance(data, dict):
        raise InvalidOptionError("body", "must be a JSON object with at least 'image' and 'prompt'")
    try:
        req = MaskRequest.model_validate(data, strict=strict)
    except ValidationError as exc:
        raise validation_error(exc) from None
    for name in ("image", "prompt", "negative_prompt", "model"):
        check_text(name, getattr(req, name))  # a JSON "\\ud800" escape alone
    if (isinstance(req.image, str) and not req.image.strip()) or (isinstance(req.image, bytes) and not req.image):
        raise InvalidOptionError("image", "is empty: send an image URL, base64 data or a file")
    if req.model is not None and not req.model.strip():
        raise InvalidOptionError("model", "is empty: leave it out for the server's default model (GET /v1/models)")
    targets = parse_prompt(req.prompt)  # an empty or blank prompt is a 400 now, not a failed job later
    if len(targets) > MAX_PROMPT_TARGETS:
        raise InvalidOptionError(
            "prompt", f"names {len(targets)} targets; at most {MAX_PROMPT_TARGETS} per request: split it in several"
        )
    scored = len(req.scored_targets(targets))
    if scored > MAX_PROMPT_TARGETS:
        raise InvalidOptionError(
            "negative_prompt",
            f"brings the targets to score to {scored} with the prompt's; at most {MAX_PROMPT_TARGETS} per request",
        )
    return req


def _json_type(value: object) -> str:
    """The JSON name of `value`'s type, for an error message: 'a number', 'an array'..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "an array"
    return "an object" if isinstance(value, dict) else f"a {type(value).__name__}"


async def read_request(request: Request, max_part_size: int) -> MaskRequest:
    """Read a JSON or form (multipart / urlencoded) body into a `MaskRequest`. A compressed body (`Content-Encoding`
    other than identity, in any of its headers) is refused, unread: it is not decoded here, and read as JSON or a form
    it is neither."""
    encoding = ", ".join(value.strip() for value in request.headers.getlist("content-encoding")).lower()
    if any(coding.strip() not in ("", "identity") for coding in encoding.split(",")):
        raise InvalidOptionError(
            "body",
            f"is sent with Content-Encoding: {shown(encoding, 40)}, which this API does not decode; send the request "
            "uncompressed",
        )
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await _read_body(request)  # whole first: the body limit applies before the form parser sees it
    check_not_an_image(body, content_type)  # curl --data-binary @photo.png labels it a urlencoded form
    if content_type == FORM_TYPES[0] or (content_type == FORM_TYPES[1] and not is_json_object(body)):
        return await _read_form(request, body, max_part_size, multipart=content_type == FORM_TYPES[0])
    return await asyncio.to_thread(_from_json, body)  # a base64 image may be tens of MB: off the event loop


async def _read_body(request: Request) -> bytearray:
    """The whole body, kept by the caller alone. `request.body()` would keep its bytes on the request for as long as
    the request runs: once parsed, a v1 request would hold its body twice during inference (the budget counts it
    once)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


def _replay(body: bytearray, chunk: int = 1 << 16) -> Receive:
    """An ASGI `receive` that sends `body` again, `chunk` bytes at a time (for the form parser)."""
    view, offset = memoryview(body), 0

    async def receive() -> Message:
        nonlocal offset
        piece = bytes(view[offset : offset + chunk])
        offset += len(piece)
        return {"type": "http.request", "body": piece, "more_body": offset < len(view)}

    return receive


def check_json_values(body: bytes | bytearray) -> None:
    """Raise `InvalidOptionError` when the JSON text `body` may parse into more than `MAX_JSON_VALUES` values, from its
    bytes alone: each value is the root, a container's first element or follows a comma, and the containers are
    counted by their opening brackets (three scans of the bytes, no copy; those inside strings count too). An
    object's keys are as many as its values at most."""
    commas, brackets = body.count(b","), body.count(b"[") + body.count(b"{")
    if 1 + commas + brackets > MAX_JSON_VALUES:
        what = "is nested too deeply" if brackets > 2 * commas else f"holds more than {MAX_JSON_VALUES} values"
        raise InvalidOptionError(
            "body", f"{what}; send one flat JSON object of the request's fields, each a string, number or boolean"
        )


def _fields_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's fields as a dict; a field given twice is an `InvalidOptionError`, as in a form (json alone
    would keep the last, which a proxy or another parser in front of this server may read as the first)."""
    fields: dict[str, Any] = {}
    for name, value in pairs:
        if name in fields:
            raise InvalidOptionError(name, "is given more than once")
        fields[name] = value
    return fields


def _from_json(body: bytearray) -> MaskRequest:
    """Parse and validate a JSON body (`check_json_values` first). `body` is emptied once it is decoded to text: the
    peak is twice the body (the text, then the text and the values parsed from it), not three times."""
    if not body or body.isspace():
        raise InvalidOptionError(
            "body",
            'is empty; send a JSON object such as {"image": "<base64, a data: URI or an http(s) URL>", "prompt": '
            "\"sofa\"}, or a multipart form with an 'image' file",
        )
    check_json_values(body)
    try:
        text = body.decode(json.detect_encoding(body), "surrogatepass")  # what json.loads(bytes) does
        body.clear()
        data = json.loads(text, object_pairs_hook=_fields_once)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidOptionError(
            "body", f"is not valid JSON ({exc}); send a JSON object, or a multipart form with an 'image' file"
        ) from None
    except RecursionError:
        raise InvalidOptionError("body", "is nested too deeply; send a flat JSON object of the fields") from None
    except InvalidOptionError:  # a field given twice (`_fields_once`)
        raise
    except ValueError:  # json's other ValueError: an integer of more than 4300 digits (sys.get_int_max_str_digits)
        raise InvalidOptionError("body", "holds a number with too many digits to read") from None
    return validate_request(data, strict=True)


async def _read_form(request: Request, body: bytearray, max_part_size: int, *, multipart: bool) -> MaskRequest:
    raw_image: bytearray | None = None
    try:  # parsed from a request of its own, which keeps no copy of the body once this returns
        if multipart:
            form, raw_image = await parse_multipart(
                request.headers, body, max_parts=MAX_FORM_PARTS, max_part_size=max_part_size
            )
        else:
            form = await Request(request.scope, _replay(body)).form(
                max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS, max_part_size=max_part_size
            )
    except (HTTPException, MultiPartException) as exc:  # starlette's answer to a malformed form
        detail = exc.detail if isinstance(exc, HTTPException) else exc.message
        raise InvalidOptionError("body", f"is not a valid form: {detail}") from None
    data: dict[str, Any] = {}
    try:
        for name, value in form.multi_items():
            if name in data:
                raise InvalidOptionError(name, "is given more than once")
            if isinstance(value, UploadFile):
                if name not in MaskRequest.model_fields:  # named before it is read
                    raise InvalidOptionError(name, "unknown field")
                content = await value.read()
                data[name] = content if name == "image" else form_value(name, _file_text(name, content))
            elif name == "image" and raw_image is not None:
                data[name] = field_image(value, raw_image)
            else:
                data[name] = form_value(name, value)
    finally:
        await form.close()
    return validate_request(data, strict=False)


def _file_text(name: str, content: bytes) -> str:
    """The text of field `name` sent as a file part (a filename given): its bytes as UTF-8."""
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidOptionError(name, "is not UTF-8 text (it was sent as a file part)") from None


class SubmitResponse(BaseModel):
    """`POST /v2/automatic-mask-generator`: the job was accepted and queued."""

    request_id: str
    status: str = "QUEUED"
    poll_url: str = Field(description="Absolute URL of the job's status (the same as status_url).")
    status_url: str
    response_url: str


class StatusResponse(BaseModel):
    """`GET /v2/requests/{id}/status`. A FAILED job is served with HTTP 422 and carries `error`."""

    model_config = ConfigDict(extra="allow")

    request_id: str
    status: str = Field(
        description="QUEUED, PROCESSING, COMPLETED or FAILED, in that order: once started, a job is PROCESSING until "
        "it ends, even while it waits to run again (its worker stopped)."
    )
    error: str | None = None


class ResultResponse(BaseModel):
    """`GET /v2/requests/{id}`: once COMPLETED, `output` is the result image's absolute URL (fetch it with the
    same key), or its base64 PNG when the request had base64=true. The result metadata follows."""

    model_config = ConfigDict(extra="allow")

    request_id: str
    status: str
    output: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description='{"inference_time": seconds}')
    error: str | None = None


class ModelInfo(BaseModel):
    """One model of `GET /v1/models`."""

    name: str = Field(description="What to send as the request's 'model'.")
    backend: str | None = Field(description="The backend that runs it (clipseg, grounded-sam, subject...).")
    description: str
    default: bool = Field(description="The model used when a request names none.")
    loaded: bool = Field(description="In memory already (else the first request that names it loads it).")


class ModelList(BaseModel):
    """`GET /v1/models`: the models installed on this server (an automask extension of the hosted API)."""

    default: str
    models: list[ModelInfo]

    @classmethod
    def of(cls, default: str, entries: Sequence[Any]) -> ModelList:
        """From the runner's `ModelEntry` dataclasses."""
        return cls(default=default, models=[ModelInfo.model_validate(e, from_attributes=True) for e in entries])


class ErrorResponse(BaseModel):
    """Every error: one sentence saying what is wrong and how to fix it."""

    error: str


class CreditsResponse(BaseModel):
    """`GET /v1/credits` (an automask extension): the calling key and its credits left."""

    key_id: str | None = Field(description="The key's id; null when the server runs without keys.")
    credits: int | None = Field(description="Requests the key may still make; null: unlimited.")
