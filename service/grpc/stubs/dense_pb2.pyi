from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_DEPTH: _ClassVar[Task]
    TASK_NORMALS: _ClassVar[Task]
    TASK_SEGMENT: _ClassVar[Task]

class OutputEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_ENCODING_UNSPECIFIED: _ClassVar[OutputEncoding]
    OUTPUT_ENCODING_RAW_FLOAT16: _ClassVar[OutputEncoding]
    OUTPUT_ENCODING_RAW_FLOAT32: _ClassVar[OutputEncoding]
    OUTPUT_ENCODING_PNG16: _ClassVar[OutputEncoding]
    OUTPUT_ENCODING_EXR: _ClassVar[OutputEncoding]
    OUTPUT_ENCODING_TIFF: _ClassVar[OutputEncoding]
    OUTPUT_ENCODING_NPY: _ClassVar[OutputEncoding]
    OUTPUT_ENCODING_COLOR: _ClassVar[OutputEncoding]

class AnswerUncertainty(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ANSWER_UNCERTAINTY_NONE: _ClassVar[AnswerUncertainty]
    ANSWER_UNCERTAINTY_STEPS: _ClassVar[AnswerUncertainty]

class FrameStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRAME_STATUS_OK: _ClassVar[FrameStatus]
    FRAME_STATUS_DROPPED: _ClassVar[FrameStatus]
    FRAME_STATUS_ERROR: _ClassVar[FrameStatus]
TASK_UNSPECIFIED: Task
TASK_DEPTH: Task
TASK_NORMALS: Task
TASK_SEGMENT: Task
OUTPUT_ENCODING_UNSPECIFIED: OutputEncoding
OUTPUT_ENCODING_RAW_FLOAT16: OutputEncoding
OUTPUT_ENCODING_RAW_FLOAT32: OutputEncoding
OUTPUT_ENCODING_PNG16: OutputEncoding
OUTPUT_ENCODING_EXR: OutputEncoding
OUTPUT_ENCODING_TIFF: OutputEncoding
OUTPUT_ENCODING_NPY: OutputEncoding
OUTPUT_ENCODING_COLOR: OutputEncoding
ANSWER_UNCERTAINTY_NONE: AnswerUncertainty
ANSWER_UNCERTAINTY_STEPS: AnswerUncertainty
FRAME_STATUS_OK: FrameStatus
FRAME_STATUS_DROPPED: FrameStatus
FRAME_STATUS_ERROR: FrameStatus

class RawImage(_message.Message):
    __slots__ = ("height", "width", "data")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    data: bytes
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("encoded", "raw", "task", "model", "processing_res", "seed", "encoding", "frame_id", "timestamp_ns", "timeout_ms", "native_size", "match_input_resolution", "steps", "steps_auto", "ensemble_size", "uncertainty")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_RES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_NS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    NATIVE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MATCH_INPUT_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEPS_AUTO_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    task: Task
    model: str
    processing_res: int
    seed: int
    encoding: OutputEncoding
    frame_id: int
    timestamp_ns: int
    timeout_ms: int
    native_size: bool
    match_input_resolution: bool
    steps: int
    steps_auto: bool
    ensemble_size: int
    uncertainty: AnswerUncertainty
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ..., task: _Optional[_Union[Task, str]] = ..., model: _Optional[str] = ..., processing_res: _Optional[int] = ..., seed: _Optional[int] = ..., encoding: _Optional[_Union[OutputEncoding, str]] = ..., frame_id: _Optional[int] = ..., timestamp_ns: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., native_size: _Optional[bool] = ..., match_input_resolution: _Optional[bool] = ..., steps: _Optional[int] = ..., steps_auto: _Optional[bool] = ..., ensemble_size: _Optional[int] = ..., uncertainty: _Optional[_Union[AnswerUncertainty, str]] = ...) -> None: ...

class StreamConfig(_message.Message):
    __slots__ = ("max_in_flight", "drop_stale", "steps_auto")
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DROP_STALE_FIELD_NUMBER: _ClassVar[int]
    STEPS_AUTO_FIELD_NUMBER: _ClassVar[int]
    max_in_flight: int
    drop_stale: bool
    steps_auto: bool
    def __init__(self, max_in_flight: _Optional[int] = ..., drop_stale: _Optional[bool] = ..., steps_auto: _Optional[bool] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("config", "frame")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    config: StreamConfig
    frame: PredictRequest
    def __init__(self, config: _Optional[_Union[StreamConfig, _Mapping]] = ..., frame: _Optional[_Union[PredictRequest, _Mapping]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("frame_id", "timestamp_ns", "status", "data", "shape", "dtype", "kind", "encoding", "model", "seed", "affine_invariant", "queue_ms", "compute_ms", "total_ms", "error_code", "error_message", "steps", "error_type", "error_field", "normals_convention", "classes", "class_pixels", "uncertainty_data", "uncertainty_method", "step_window", "uncertainty_decodes", "uncertainty_unit", "uncertainty_measure", "uncertainty_png_max", "uncertainty_max")
    class ClassPixelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_NS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    AFFINE_INVARIANT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_FIELD_NUMBER: _ClassVar[int]
    NORMALS_CONVENTION_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_PIXELS_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_DATA_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_METHOD_FIELD_NUMBER: _ClassVar[int]
    STEP_WINDOW_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_DECODES_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_UNIT_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_MEASURE_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_PNG_MAX_FIELD_NUMBER: _ClassVar[int]
    UNCERTAINTY_MAX_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    timestamp_ns: int
    status: FrameStatus
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    kind: str
    encoding: OutputEncoding
    model: str
    seed: int
    affine_invariant: bool
    queue_ms: float
    compute_ms: float
    total_ms: float
    error_code: int
    error_message: str
    steps: int
    error_type: str
    error_field: str
    normals_convention: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    class_pixels: _containers.ScalarMap[str, int]
    uncertainty_data: bytes
    uncertainty_method: str
    step_window: int
    uncertainty_decodes: int
    uncertainty_unit: str
    uncertainty_measure: str
    uncertainty_png_max: float
    uncertainty_max: float
    def __init__(self, frame_id: _Optional[int] = ..., timestamp_ns: _Optional[int] = ..., status: _Optional[_Union[FrameStatus, str]] = ..., data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., kind: _Optional[str] = ..., encoding: _Optional[_Union[OutputEncoding, str]] = ..., model: _Optional[str] = ..., seed: _Optional[int] = ..., affine_invariant: _Optional[bool] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ..., steps: _Optional[int] = ..., error_type: _Optional[str] = ..., error_field: _Optional[str] = ..., normals_convention: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., class_pixels: _Optional[_Mapping[str, int]] = ..., uncertainty_data: _Optional[bytes] = ..., uncertainty_method: _Optional[str] = ..., step_window: _Optional[int] = ..., uncertainty_decodes: _Optional[int] = ..., uncertainty_unit: _Optional[str] = ..., uncertainty_measure: _Optional[str] = ..., uncertainty_png_max: _Optional[float] = ..., uncertainty_max: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("id", "family", "task", "output_kind", "processing_res", "backend", "device", "dtype", "max_batch_size", "generative", "multi_step", "default_steps", "classes", "base_model", "normals_convention", "random_weights")
    ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_RES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GENERATIVE_FIELD_NUMBER: _ClassVar[int]
    MULTI_STEP_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    NORMALS_CONVENTION_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    family: str
    task: str
    output_kind: str
    processing_res: int
    backend: str
    device: str
    dtype: str
    max_batch_size: int
    generative: bool
    multi_step: bool
    default_steps: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    base_model: str
    normals_convention: str
    random_weights: bool
    def __init__(self, id: _Optional[str] = ..., family: _Optional[str] = ..., task: _Optional[str] = ..., output_kind: _Optional[str] = ..., processing_res: _Optional[int] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., generative: _Optional[bool] = ..., multi_step: _Optional[bool] = ..., default_steps: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., base_model: _Optional[str] = ..., normals_convention: _Optional[str] = ..., random_weights: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
