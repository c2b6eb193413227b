"""One settings object, read when asked for (never at import): `AUTOMASK_*` environment variables, then flags."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from automask.errors import InvalidOptionError
from automask.nat64 import parse_prefixes
from automask.options import RaisesInvalidOption, validation_error

_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|hpu|npu|mtia|xla)(:[0-9]+)?")
"""The torch devices automask runs on (whether this machine has them is checked when a torch model loads)."""


def _default_data_dir() -> Path:
    return Path.home() / ".cache" / "automask"


class Settings(BaseSettings, metaclass=RaisesInvalidOption):
    """Process-wide settings. Construct with `Settings()` to read the environment, or pass overrides. A bad value
    (given, or from its AUTOMASK_* variable) or an unknown name is an `InvalidOptionError` naming it; unknown
    AUTOMASK_* environment variables are ignored."""

    model_config = SettingsConfigDict(env_prefix="AUTOMASK_", extra="forbid", frozen=True)
    _names: dict[str, str] = PrivateAttr(default_factory=dict)  # `given_as`

    data_dir: Path = Field(default_factory=_default_data_dir, description="Models, keys database, job results.")
    model: str | None = Field(
        default=None, description="Model name (e.g. 'clipseg') or a local folder; None: the default."
    )
    device: str = Field(default="cpu", description="Torch device for torch backends: 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    allow_private_urls: bool = Field(default=False, description="Let image URLs reach private/loopback addresses.")
    nat64_prefixes: Annotated[tuple[ipaddress.IPv6Network, ...], NoDecode] = Field(
        default=(),
        description="This network's own NAT64 prefixes (/32, /40, /48, /56, /64 or /96; comma-separated in "
        "AUTOMASK_NAT64_PREFIXES): an image URL's address in one is judged by the IPv4 address it carries, as one of "
        "64:ff9b::/96 is.",
    )
    fetch_timeout: float = Field(
        default=10.0,
        gt=0,
        le=3600.0,
        description="Seconds allowed to fetch an image URL (an hour at most: a thread or socket cannot wait for inf).",
    )
    max_image_bytes: int = Field(
        default=32 * 1024 * 1024, gt=0, description="Largest encoded image accepted, in bytes."
    )
    max_image_pixels: int = Field(default=40_000_000, gt=0, description="Largest decoded image accepted, in pixels.")
    max_redirects: int = Field(default=3, ge=0, le=10, description="Redirects followed when fetching an image URL.")
    threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads for inference; None: one per physical core (the runtimes' default).",
    )
    offline: bool = Field(
        default=False,
        description="Never download on its own (AUTOMASK_OFFLINE=1, HF_HUB_OFFLINE=1 or --no-download): the embedded "
        "'subject' model is then not installed on first use (automask models pull still downloads when asked).",
    )
    preset: Literal["reference", "fast"] = Field(
        default="reference",
        description="reference: the checkpoints' own settings (float32; GroundingDINO at its processor's shortest "
        "edge, 800). fast: GroundingDINO at 512 and SAM/SAM 2/GroundingDINO in bfloat16 on CPUs with native bf16 "
        "(faster; not validated on real weights).",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="SAM/SAM 2/EdgeTAM/GroundingDINO/SAM 3 compute type. auto: per preset (reference: fp32, bf16 "
        "autocast for SAM 3 on CUDA as its reference code; fast: bf16 on CPUs with native bf16).",
    )
    detector_size: int | None = Field(
        default=None,
        ge=32,
        le=1333,
        description="GroundingDINO input shortest edge. None: per preset (reference: 800, fast: 512).",
    )
    mask_head: Literal["auto", "sam", "sam2", "edgetam"] = Field(
        default="auto", description="Mask head for refine=true: auto = SAM if installed, else SAM 2, else EdgeTAM."
    )
    route_embedded: bool = Field(
        default=True,
        description="With an open-vocabulary model, send subject/person/background words to the embedded model.",
    )
    runtime: Literal["auto", "onnx", "torch"] = Field(
        default="auto",
        description="CLIPSeg runtime. auto: ONNX Runtime when the model has an ONNX export (CPU), else torch.",
    )
    int8: bool = Field(default=False, description="Use the int8 (dynamically quantized) ONNX export; not validated.")
    database_url: str | None = Field(
        default=None, description="sqlite:///PATH or postgresql://USER:PASS@HOST:PORT/DB; None: <data_dir>/automask.db."
    )
    broker_url: str | None = Field(
        default=None,
        description="amqp://USER:PASS@HOST:PORT/VHOST (RabbitMQ): API nodes queue every request to workers.",
    )
    redis_url: str | None = Field(
        default=None, description="redis://HOST:PORT/N: rate limits shared by every API node, and the v1 hand-off."
    )

    @staticmethod
    def invalid_option(exc: ValidationError) -> InvalidOptionError:
        """The error `Settings(...)` raises for `exc`: the setting named with its environment variable (a value may
        come from either), or an unknown name with the known ones."""
        err = validation_error(exc)
        if err.field not in Settings.model_fields:
            return InvalidOptionError(
                err.field, f"unknown setting; the settings are: {', '.join(Settings.model_fields)}"
            )
        return InvalidOptionError(f"{err.field} (AUTOMASK_{err.field.upper()})", err.reason)

    @field_validator("data_dir", mode="before")
    @classmethod
    def _not_empty(cls, v: object) -> object:
        """'' refused (an unset variable of a unit or compose file), which `Path('')` reads as '.': the folder the
        process runs in would hold the models, keys and results."""
        if v == "":
            raise ValueError(
                "the path is empty (an unset variable?): name a folder, or leave the variable out for the default "
                "(~/.cache/automask)."
            )
        return v

    @field_validator("data_dir")
    @classmethod
    def _home_expanded(cls, v: Path) -> Path:
        """'~' as the shell would expand it: an env file or a service unit (or --data-dir=~/x) passes it as is."""
        return v.expanduser()

    @field_validator("nat64_prefixes", mode="before")
    @classmethod
    def _nat64_prefixes(cls, v: object) -> tuple[ipaddress.IPv6Network, ...]:
        return parse_prefixes(v)

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not _DEVICE.fullmatch(v):
            raise ValueError(f"must be cpu, cuda, cuda:N (a GPU's index), mps or another torch device type, not {v!r}")
        return "cpu" if v.startswith("cpu") else v  # torch takes cpu:N as cpu (one CPU device)

    def name_of(self, setting: str) -> str:
        """How the user gave `setting` (for messages): the name `given_as` recorded, else its AUTOMASK_* variable."""
        return self._names.get(setting, f"AUTOMASK_{setting.upper()}")

    def given_as(self, names: dict[str, str]) -> Settings:
        """These settings, recording how some of them were given (setting -> a name such as a flag's) for
        `name_of`: messages about a value then name what the user set."""
        copy = self.model_copy()
        copy._names = {**self._names, **names}
        return copy

    @property
    def models_dir(self) -> Path:
        """Where `automask models pull` stores weights: `<data_dir>/models`."""
        return self.data_dir / "models"
