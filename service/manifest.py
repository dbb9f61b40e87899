"""The bundle manifest: one pydantic model, its JSON Schema, and the bundle's file layout.

A bundle is the directory ``model_store/<name>/<version>/`` holding exactly these files (any other file must be
listed with its sha256 in ``files``, or loading fails):

- ``model.onnx``: one self-contained ONNX file, input float32 (B,C,H,W) in [0,1] (normalisation inside the
  graph), dynamic batch axis, output logits (B, n_classes).
- ``pool.npz``: ``images`` uint8 (P,C,H,W) and ``labels`` int64 (P,), sorted by label (``allow_pickle=False``).
- ``splits.npz``: int64 index arrays ``train``, ``pool``, ``calibration``, ``test`` into the dataset's canonical
  order; test is disjoint from train, pool and calibration; calibration is disjoint from train and pool.
- ``weights.safetensors``: the same network's weights, for gradient-based evaluation (not needed to serve;
  absent from imported bundles, whose twin is ``model.onnx`` converted to torch).
- ``manifest.json``: this model, written last.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.mi.params import MIParams

#: 2: ``input.range`` removed (preprocessing always gives [0, 1]; a model that wants another range converts inside
#: its graph). Version 1 manifests are refused with how to re-export (:data:`RETIRED_SCHEMAS`).
SCHEMA_VERSION: Final = 2
#: schema versions this mixinfer no longer reads -> what changed
RETIRED_SCHEMAS: Final = {1: "input.range was removed in schema_version 2"}
MODEL_FILE = "model.onnx"
POOL_FILE = "pool.npz"
SPLITS_FILE = "splits.npz"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
#: Files every bundle lists; all but the weights are needed to serve.
BUNDLE_FILES = (MODEL_FILE, POOL_FILE, SPLITS_FILE, WEIGHTS_FILE)
SERVING_FILES = (MODEL_FILE, POOL_FILE, SPLITS_FILE)
SPLIT_NAMES = ("train", "pool", "calibration", "test")
GAP_QUANTILE_KEYS = ("0.05", "0.5", "0.95")

_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^[1-9][0-9]{0,8}$"
_SHA256_PATTERN = r"^[0-9a-f]{64}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InputSpec(_Frozen):
    """What the ONNX model takes: float32 pixels (B, C, H, W) in [0, 1]; normalisation is inside the graph."""

    name: str = Field("images", description="ONNX input name")
    shape: tuple[int, int, int] = Field(description="(C, H, W) of one image")
    output_name: str = Field("logits", description="ONNX output name: logits (B, n_classes)")

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if v[0] not in (1, 3) or v[1] < 1 or v[2] < 1:
            raise ValueError(f"input shape must be (C in {{1,3}}, H >= 1, W >= 1), got {v}")
        return v


class DatasetInfo(_Frozen):
    """Where the data came from, to reproduce the splits."""

    name: str = Field(description="dataset id, e.g. 'mnist5k', 'cifar10', 'imagefolder'")
    sha256: str = Field(pattern=_SHA256_PATTERN, description="hash of the canonical images and labels")
    n_images: int = Field(ge=1, description="images in the canonical order the splits index")


class SplitSizes(_Frozen):
    """Sizes of the recorded splits (the indices themselves are in splits.npz)."""

    train: int = Field(ge=0)
    pool: int = Field(ge=1)
    calibration: int = Field(ge=0)
    test: int = Field(ge=0)


class Calibration(_Frozen):
    """Detection-gap statistics measured through the exported model and the real engine on clean images."""

    split: str = Field("calibration", description="which split was used")
    n_images: int = Field(ge=1)
    seed: int = Field(description="MIXINFER_SEED of the engine that measured it")
    gap_quantiles: dict[str, float] = Field(description="clean-gap quantiles, keys '0.05', '0.5', '0.95' at least")
    false_flag_rate: float = Field(ge=0.0, le=1.0, description="clean flag rate at the chosen threshold")

    @field_validator("gap_quantiles")
    @classmethod
    def _has_keys(cls, v: dict[str, float]) -> dict[str, float]:
        missing = [k for k in GAP_QUANTILE_KEYS if k not in v]
        if missing:
            raise ValueError(f"gap_quantiles needs keys {list(GAP_QUANTILE_KEYS)}, missing {missing}")
        return v


class Accuracy(_Frozen):
    """Accuracies on the test split, with the engine seed that produced them (reproducible exactly)."""

    split: str = "test"
    n_images: int = Field(ge=1)
    seed: int
    plain: float = Field(ge=0.0, le=1.0, description="undefended model")
    mi_combined: float = Field(ge=0.0, le=1.0, description="MI-Combined with the manifest's parameters")
    mi_pl: float | None = Field(None, ge=0.0, le=1.0)
    mi_ol: float | None = Field(None, ge=0.0, le=1.0, description="stand-alone MI-OL")
    flag_rate: float | None = Field(None, ge=0.0, le=1.0, description="MI-Combined clean flag rate")


class Recipe(_Frozen):
    """How the bundle was made."""

    command: str
    seed: int
    mixinfer_version: str
    training: dict[str, float | int | str | bool] = Field(default_factory=dict, description="hyper-parameters")


class ImportParity(_Frozen):
    """Served graph against the user's original model on the user's images (probabilities)."""

    n_images: int = Field(ge=1)
    batch: int = Field(ge=1, description="images per call of the batched comparison")
    max_dp_batch1: float = Field(ge=0.0, description="max |delta p| with one image per call")
    max_dp_batched: float = Field(ge=0.0, description="max |delta p| with `batch` images per call")
    tol: float = Field(gt=0.0, description="--parity-tol: the import is refused above it")


class ImportTwin(_Frozen):
    """The differentiable twin (served graph converted to torch with onnx2torch) for gradient attacks."""

    converted: bool
    max_dp: float | None = Field(None, ge=0.0, description="max |delta p| against the served graph")
    zero_gradient_images: int | None = Field(None, ge=0, description="check images with an all-zero gradient")
    reason: str | None = Field(None, description="why there is no twin (black-box evaluation only)")


class ImportInfo(_Frozen):
    """How an exported model was imported (``mixinfer import``); the adapters are inside ``model.onnx``."""

    source_file: str = Field(description="file name of the user's ONNX model")
    source_sha256: str = Field(pattern=_SHA256_PATTERN, description="sha256 of the user's ONNX file")
    source_input: str
    source_output: str
    opset: int = Field(ge=1)
    input_layout: Literal["nchw", "nhwc"]
    pixel_range: Literal["0-1", "0-255"]
    mean: tuple[float, ...] | None = Field(None, description="per channel, in pixel_range units")
    std: tuple[float, ...] | None = None
    input_type: Literal["float32", "float16", "uint8"]
    output: Literal["logits", "probabilities"]
    batch: Literal["symbolic", "dynamic", "scan"] = Field(
        description="symbolic: the model's own batch axis; dynamic: a fixed batch of 1 made symbolic; scan: run "
        "one image at a time inside an ONNX Scan"
    )
    class_names_from: Literal["data", "file"]
    parity: ImportParity
    twin: ImportTwin
    training_data: str = Field(description="what is known about the model's training data")
    test_dir: str | None = Field(None, description="--test-dir: the held-out folder of the test split")


class Manifest(_Frozen):
    """``manifest.json`` of a bundle; see the module docstring for the layout."""

    schema_version: Literal[2] = SCHEMA_VERSION
    name: str = Field(pattern=_NAME_PATTERN, description="equals the bundle's parent directory name")
    version: str = Field(pattern=VERSION_PATTERN, description="positive integer, equals the directory name")
    description: str = ""
    created: str = Field(description="ISO 8601 UTC time of export")
    architecture: str = Field(description="registry name of the network, e.g. 'mnist_cnn', 'resnet50_3layer'")
    class_names: tuple[str, ...] = Field(min_length=2)
    input: InputSpec
    dataset: DatasetInfo
    mi: MIParams
    splits: SplitSizes
    calibration: Calibration
    accuracy: Accuracy
    recipe: Recipe
    files: dict[str, str] = Field(description="sha256 of every file in the bundle but manifest.json")
    imported: ImportInfo | None = Field(None, description="set for bundles made by `mixinfer import` (no weights)")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @field_validator("class_names")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"class_names must be unique, got {list(v)}")
        return v

    @field_validator("files")
    @classmethod
    def _hashes(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for fname, digest in v.items():
            if "/" in fname or "\\" in fname or fname.startswith(".") or fname == MANIFEST_FILE:
                raise ValueError(f"files: {fname!r} is not a plain file name of the bundle")
            if not re.fullmatch(_SHA256_PATTERN, digest):
                raise ValueError(f"files[{fname!r}]: expected a 64-hex sha256, got {digest!r}")
        return v

    @model_validator(mode="after")
    def _listed(self) -> Manifest:
        needed = SERVING_FILES if self.imported is not None else BUNDLE_FILES
        missing = [f for f in needed if f not in self.files]
        if missing:
            raise ValueError(f"files must list {list(needed)}, missing {missing}")
        return self

    @model_validator(mode="after")
    def _split_sizes(self) -> Manifest:
        total = self.splits.train + self.splits.calibration + self.splits.test
        if total > self.dataset.n_images:
            raise ValueError(
                f"splits train+calibration+test = {total} exceed the dataset's {self.dataset.n_images} images"
            )
        return self


def manifest_json_schema() -> dict[str, object]:
    """The JSON Schema of ``manifest.json`` (committed as ``model_store/manifest.schema.json``)."""
    schema = Manifest.model_json_schema()
    schema["$id"] = "https://mixinfer.dev/schemas/manifest-v1.json"
    return schema


def write_json_schema(path: Path) -> None:
    """Write the manifest JSON Schema to ``path`` (keeps the committed copy in step with the model)."""
    path.write_text(json.dumps(manifest_json_schema(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
