"""Request and response bodies, as pydantic models: they document the API (OpenAPI) and pin its shape."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from service.mi.params import Branch, Mode


# --- errors ---------------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable error code, e.g. 'invalid_input', 'overloaded'")
    message: str = Field(description="what was wrong, what was expected, what was got")


class ErrorBody(BaseModel):
    """The error shape of every non-OIP route."""

    error: ErrorDetail


class OipErrorBody(BaseModel):
    """The error shape of the Open Inference Protocol v2 routes."""

    error: str


def oip_errors(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of an OIP route: status -> error body model and description."""
    return {code: {"model": OipErrorBody, "description": text} for code, text in descriptions.items()}


# --- /predict -------------------------------------------------------------------------------------------------
class B64Instance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    b64: str = Field(description="base64 of an encoded PNG/JPEG/WebP/BMP/GIF image")


ArrayInstance = list[list[float]] | list[list[list[float]]]


class PredictJsonBody(BaseModel):
    """JSON body of ``POST /predict``: images as base64 or as numeric arrays in [0, 1] at the model's exact size."""

    instances: list[B64Instance | ArrayInstance] = Field(
        min_length=1, description="one entry per image: {'b64': ...}, or an (H,W) / (C,H,W) array in [0, 1]"
    )


class Prediction(BaseModel):
    """One image's answer; ``detection_gap``, ``threshold`` and ``mixes`` only at MIXINFER_RESPONSE_DETAIL=full."""

    label: str = Field(description="class name of the returned prediction")
    class_index: int = Field(description="index of that class")
    probabilities: dict[str, float] = Field(
        description="class name -> probability, most probable first: every class (top_k if asked) at full detail, "
        "the 3 most probable (or top_k if fewer) at label detail"
    )
    adversarial: bool | None = Field(description="detection flag (gap >= threshold); null in modes ol and off")
    mode: Branch = Field(description="the branch that answered: pl, ol or off")
    detection_gap: float | None = Field(
        None, description="full detail only: plain top-1 confidence minus max MI-PL probability; null in ol/off"
    )
    threshold: float | None = Field(None, description="full detail only: the model's detection threshold")
    mixes: int | None = Field(None, description="full detail only: blends averaged for this image")


class PredictResponse(BaseModel):
    model: str
    version: str
    predictions: list[Prediction]


# --- /info and /recent-gaps (the client's metadata, the browser page) ------------------------------------------
class InfoResponse(BaseModel):
    server_version: str = Field(description="mixinfer version of the server")
    model: str = Field(description="the served model's name")
    version: str = Field(description="the served version")
    classes: list[str] = Field(description="class names in index order")
    input_shape: list[int] = Field(description="one image as the model takes it: channels, height, width")
    response_detail: Literal["label", "full"] = Field(
        description="label: label, flag, top-3 probabilities; full: also gap, threshold, all probabilities"
    )


class RecentGapsResponse(BaseModel):
    model: str
    version: str
    threshold: float = Field(description="the served model's detection threshold")
    window: int = Field(description="how many of the latest computed gaps are kept")
    gaps: list[float] = Field(description="the latest computed detection gaps of the served version, oldest first")


# --- health ---------------------------------------------------------------------------------------------------
class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


# --- Open Inference Protocol v2 -------------------------------------------------------------------------------
class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


#: the one input datatype served: what the model metadata advertises and the only one accepted
INPUT_DATATYPE = "FP32"
#: shape dimensions are non-negative JSON integers (``true`` is not an integer here)
Dim = Annotated[StrictInt, Field(ge=0)]


class InferInputParameters(BaseModel):
    binary_data_size: StrictInt | None = Field(
        None, ge=0, description="bytes of this input in the binary part (binary tensor extension)"
    )


class InferInput(BaseModel):
    name: StrictStr
    shape: list[Dim] = Field(max_length=16)
    datatype: Literal["FP32"] = Field(description="FP32 pixels in [0, 1], as the model metadata advertises")
    parameters: InferInputParameters | None = Field(None, description="'binary_data_size' with the binary extension")
    data: list[Any] | None = Field(None, description="row-major values (flat or nested); absent when binary")


class InferOutputParameters(BaseModel):
    binary_data: StrictBool | None = Field(None, description="true: return this output in the binary part")


class InferRequestedOutput(BaseModel):
    name: Literal["probabilities", "label", "adversarial", "detection_gap", "top_classes", "top_probabilities"] = Field(
        description="label detail: label, adversarial, top_classes, top_probabilities; full detail: probabilities, "
        "label, adversarial, detection_gap"
    )
    parameters: InferOutputParameters | None = None


class InferParameters(BaseModel):
    binary_data_output: StrictBool = Field(False, description="default 'binary_data' of every requested output")
    mode: Mode | None = Field(None, description="combined (default); others need ALLOW_MODE_OVERRIDE")


class InferRequest(BaseModel):
    """``POST /v2/models/{name}/infer``: JSON, or JSON header + binary tensors (``Inference-Header-Content-Length``).

    The server validates the JSON header with this model: unknown parameters are ignored, known ones must have
    their type (a string ``"false"`` is not a boolean).
    """

    id: StrictStr | None = None
    parameters: InferParameters | None = None
    inputs: list[InferInput] = Field(min_length=1, max_length=1)
    outputs: list[InferRequestedOutput] | None = None


class InferOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


class LoadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(
        None, pattern=r"^[1-9][0-9]{0,8}$", description="a version in the store; default highest"
    )


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parameters: LoadParameters = Field(default_factory=lambda: LoadParameters(version=None))


class LoadResponse(BaseModel):
    name: str
    version: str
    previous_version: str | None = Field(description="what was served (or was, before an unload); null if nothing")


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ready: StrictBool = Field(False, description="true: list the ready versions only")


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE"]
    reason: str


class UnloadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    unload_dependents: StrictBool = Field(False, description="accepted for Triton clients; there are no dependents")


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parameters: UnloadParameters = Field(default_factory=lambda: UnloadParameters(unload_dependents=False))


class UnloadResponse(BaseModel):
    name: str
    version: str
    state: Literal["UNAVAILABLE"]


class DurationStat(BaseModel):
    count: int
    ns: int


class BatchStats(BaseModel):
    batch_size: int
    compute_input: DurationStat
    compute_infer: DurationStat
    compute_output: DurationStat


class ModelStatistics(BaseModel):
    """Triton's per-version statistics (see service/api/stats.py for what each duration covers)."""

    name: str
    version: str
    last_inference: int = Field(description="ms since the epoch of the last answer; 0 if none")
    inference_count: int = Field(description="images answered")
    execution_count: int = Field(description="engine calls")
    inference_stats: dict[str, DurationStat]
    batch_stats: list[BatchStats]


class ModelStatsResponse(BaseModel):
    model_stats: list[ModelStatistics]
