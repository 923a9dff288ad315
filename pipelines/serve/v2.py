"""The Open Inference Protocol (KServe V2) over REST, with the binary tensor data extension.

Plain functions, no Ray: :mod:`pipelines.serve.app` routes ``/v2/...`` here to parse a request
into images and to assemble the answer, and runs everything in between (limits, batching, the
durable log, the API key) exactly as for ``POST /v1/segment``.  The protocol is the one Triton,
KServe, Seldon MLServer and OpenVINO Model Server speak
(https://github.com/kserve/open-inference-protocol, ``binary_tensor_data`` extension), so their
clients (``tritonclient.http``, KServe's ``InferenceRESTClient``) call rayseg unchanged.

The model, as the protocol sees it:

- input ``IMAGE``: ``BYTES [N]`` (or ``[N, 1]``), each element one encoded image in any format
  the endpoint decodes (PNG, JPEG, BMP, GIF, TIFF), or ``UINT8 [N, H, W, C]`` pixels (C in 1, 3,
  4), row-major.  In the binary extension a BYTES element is a 4-byte little-endian length and
  then its bytes; JSON ``data`` can only carry UTF-8 text, so encoded images go binary.
- outputs (all of them when the request names none; ``CONFIDENCE`` only when named):

  ========================  ========  ====================================================
  ``MASK``                  UINT8     ``[N, H, W]`` class ids; multi-label ``[N, K, H, W]`` {0, 1}
  ``CONFIDENCE``            FP32      ``[N, H, W]`` the confidence map, in [0, 1]
  ``CLASS_PIXEL_COUNTS``    INT64     ``[N, K]`` pixels per class
  ``IMAGE_SIZE``            INT32     ``[N, 2]`` each image's height and width
  ========================  ========  ====================================================

  A batch of images of different sizes answers tensors of the largest height and width; each
  image's pixels sit at the top left and the rest is :data:`MASK_PAD` in ``MASK`` and NaN in
  ``CONFIDENCE`` (``IMAGE_SIZE`` says where each image ends).

Every refusal is a :class:`~pipelines.serve.http.RequestRefused` (400 for a request that breaks
the protocol, the decoder's 413 / 415 / 422 for a bad image, 404 for another model), answered as
``{"error": "..."}`` by :func:`error_response`.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from starlette.responses import JSONResponse, Response

from pipelines.serve.http import RequestRefused

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT = "IMAGE"
MASK, CONFIDENCE, COUNTS, SIZE = "MASK", "CONFIDENCE", "CLASS_PIXEL_COUNTS", "IMAGE_SIZE"
DEFAULT_OUTPUTS = (MASK, COUNTS, SIZE)    # what a request that names no output gets
OUTPUTS = (MASK, CONFIDENCE, COUNTS, SIZE)
MASK_PAD = 255          # MASK where a smaller image of a batch has no pixel
MAX_IMAGES = 64         # images in one request (each becomes one row of the log)
MAX_ID_CHARS = 256      # a request ``id`` longer than this is refused (it is stored in Parquet)
EXTENSIONS = ("binary_tensor_data",)
_DTYPES = {MASK: ("UINT8", np.uint8), CONFIDENCE: ("FP32", np.float32),
           COUNTS: ("INT64", np.int64), SIZE: ("INT32", np.int32)}


@dataclass(frozen=True)
class Wanted:
    """One requested output and whether it goes as binary data."""

    name: str
    binary: bool


@dataclass
class InferRequest:
    """A parsed ``POST .../infer``: the images (encoded bytes or pixel arrays) and the outputs."""

    id: str | None
    encoded: list[bytes] = field(default_factory=list)      # BYTES input
    arrays: list[np.ndarray] = field(default_factory=list)  # UINT8 input, H x W x C each
    outputs: tuple[Wanted, ...] = ()

    @property
    def count(self) -> int:
        return len(self.encoded) or len(self.arrays)

    def wants(self, name: str) -> bool:
        return any(wanted.name == name for wanted in self.outputs)


# ------------------------------------------------------------------------------------ parsing
def parse_infer(body: bytes, header_length: str | None, *, max_pixels: int) -> InferRequest:
    """Parse an infer request (JSON, or JSON then binary tensor data) or refuse it with a 400.

    ``header_length`` is the ``Inference-Header-Content-Length`` header (None without the
    binary extension).  UINT8 images over ``max_pixels`` are refused with 413 like a decoded
    image would be; encoded images are checked when they are decoded.
    """
    split = _header_split(body, header_length)
    try:
        text = body[:split].decode("utf-8")
    except UnicodeDecodeError as error:
        raise _bad(f"the JSON header is not UTF-8 (byte {error.start})",
                   "send the inference header as UTF-8 JSON") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise _bad(f"the JSON header does not parse: {str(error)[:200]}",
                   f"if the body also holds binary tensors, say where the JSON ends in the "
                   f"{HEADER_LENGTH} header") from None
    if not isinstance(header, dict):
        raise _bad(f"the JSON header is a {type(header).__name__}, not an object",
                   'send {"inputs": [{"name": "IMAGE", ...}]}')
    request = InferRequest(id=_request_id(header.get("id")))
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad(f"expected one input, {INPUT!r}; got {_describe(inputs)}",
                   f'send "inputs": [{{"name": "{INPUT}", "datatype": "BYTES", ...}}]')
    binary = memoryview(body)[split:]
    used = _read_input(inputs[0], binary, request, max_pixels)
    if used != len(binary):
        raise _bad(f"the body holds {len(binary) - used} bytes after the last binary tensor",
                   "send each tensor's bytes once, in input order, and nothing after them")
    request.outputs = _wanted(header.get("outputs"), header.get("parameters"))
    return request


def _header_split(body: bytes, header_length: str | None) -> int:
    if header_length is None:
        return len(body)
    value = header_length.strip()
    if not value.isascii() or not value.isdigit():
        raise _bad(f"{HEADER_LENGTH} is {value[:40]!r}, not a byte count",
                   "set it to the length in bytes of the JSON at the start of the body")
    length = int(value)
    if not 0 < length <= len(body):
        raise _bad(f"{HEADER_LENGTH} says the JSON is {length} bytes; the body has {len(body)}",
                   "set it to the length in bytes of the JSON at the start of the body")
    return length


def _request_id(value: Any) -> str | None:
    if value is None:
        return None
    if (not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS
            or not value.isprintable()):   # lone surrogates are not printable: not UTF-8
        raise _bad(f"request id {_describe(value)} is not 1 to {MAX_ID_CHARS} printable "
                   f"characters", "send a short id such as a UUID, or none")
    return value


def _read_input(spec: dict, binary: memoryview, request: InferRequest, max_pixels: int) -> int:
    """Fill ``request`` with the images of input ``spec``; returns the binary bytes it used."""
    if spec.get("name") != INPUT:
        raise _bad(f"unknown input {_describe(spec.get('name'))}; this model takes {INPUT!r}",
                   f'name the input "{INPUT}"')
    datatype, shape = spec.get("datatype"), spec.get("shape")
    if (not isinstance(shape, list) or not shape or len(shape) > 4
            or not all(type(n) is int and n >= 0 for n in shape)):
        raise _bad(f"input shape {_describe(shape)} is not a list of non-negative integers",
                   'send e.g. "shape": [2] for two encoded images')
    if datatype == "BYTES":
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise _bad(f"a BYTES {INPUT} has shape [N] or [N, 1]; got {shape}",
                       "send one encoded image per element")
        count = shape[0]
    elif datatype == "UINT8":
        if len(shape) != 4 or shape[3] not in (1, 3, 4):
            raise _bad(f"a UINT8 {INPUT} has shape [N, H, W, C] with C 1, 3 or 4; got {shape}",
                       "send pixels as batch x height x width x channels, row-major")
        count = shape[0]
        height, width = shape[1], shape[2]
        if height * width > max_pixels:
            raise RequestRefused(413, "too_many_pixels",
                                 f"{INPUT} images are {height}x{width} = {height * width} "
                                 f"pixels, the limit is {max_pixels}",
                                 "downscale or crop the image, or raise max_pixels")
        if height == 0 or width == 0:
            raise _bad(f"a UINT8 {INPUT} of shape {shape} holds no pixels",
                       "send images of at least 1 x 1 pixel")
    else:
        raise _bad(f"{INPUT} has datatype {_describe(datatype)}; expected BYTES (encoded "
                   f"images) or UINT8 (pixels)", "set datatype to BYTES or UINT8")
    if not 0 < count <= MAX_IMAGES:
        raise _bad(f"the request holds {count} images; one request takes 1 to {MAX_IMAGES}",
                   f"split the batch into requests of at most {MAX_IMAGES}")
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad(f"input parameters are {_describe(parameters)}, not an object", "")
    size = parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0:
            raise _bad(f"binary_data_size is {_describe(size)}, not a byte count", "")
        if size > len(binary):
            raise _bad(f"binary_data_size is {size} bytes, but only {len(binary)} follow the "
                       f"JSON header", f"check {HEADER_LENGTH} and binary_data_size")
        if "data" in spec:
            raise _bad(f"{INPUT} has both binary_data_size and data", "send one of them")
        raw = binary[:size]
        if datatype == "BYTES":
            request.encoded = _bytes_elements(raw, count)
        else:
            request.arrays = _pixels(np.frombuffer(raw, dtype=np.uint8), shape)
        return size
    data = spec.get("data")
    if not isinstance(data, list):
        raise _bad(f"{INPUT} has no data and no binary_data_size",
                   "send the tensor in data, or as binary data after the JSON header")
    flat = _flatten(data)
    if datatype == "BYTES":
        if len(flat) != count or not all(isinstance(item, str) for item in flat):
            raise _bad(f"a BYTES {INPUT} of shape {shape} needs {count} strings in data",
                       "encoded images are not UTF-8 text: send them as binary data")
        request.encoded = [item.encode("utf-8", "surrogatepass") for item in flat]
    else:
        if not all(type(item) is int and 0 <= item <= 255 for item in flat):
            raise _bad("UINT8 data holds values that are not integers in 0..255", "")
        request.arrays = _pixels(np.asarray(flat, dtype=np.uint8), shape)
    return 0


def _bytes_elements(raw: memoryview, count: int) -> list[bytes]:
    """The binary form of a BYTES tensor: per element, a 4-byte little-endian length, then it."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise _bad("a BYTES element's 4-byte length runs past its tensor's data",
                       "prefix each element with its length as a little-endian uint32")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise _bad(f"a BYTES element says {length} bytes, only {len(raw) - offset} remain",
                       "check each element's length prefix and binary_data_size")
        elements.append(bytes(raw[offset:offset + length]))
        offset += length
    if len(elements) != count:
        raise _bad(f"the BYTES data holds {len(elements)} elements, the shape says {count}",
                   "make the shape agree with the elements sent")
    return elements


def _pixels(flat: np.ndarray, shape: Sequence[int]) -> list[np.ndarray]:
    if flat.size != math.prod(shape):
        raise _bad(f"UINT8 data holds {flat.size} values, shape {list(shape)} needs "
                   f"{math.prod(shape)}", "make the shape agree with the bytes sent")
    batch = flat.reshape(shape)
    return [np.ascontiguousarray(image) for image in batch]


def _flatten(data: list, depth: int = 0) -> list:
    """JSON tensor data, flat or nested row-major, as one flat list (at most 4 levels deep)."""
    flat: list = []
    for item in data:
        if isinstance(item, list):
            if depth >= 3:
                raise _bad("tensor data nests deeper than a 4-D shape", "send data flat, row-major")
            flat.extend(_flatten(item, depth + 1))
        else:
            flat.append(item)
    return flat


def _wanted(outputs: Any, parameters: Any) -> tuple[Wanted, ...]:
    """The requested outputs; without a list, :data:`DEFAULT_OUTPUTS`, binary when the request's
    ``binary_data_output`` parameter says so (what ``tritonclient`` sends when it names none)."""
    if parameters is not None and not isinstance(parameters, dict):
        raise _bad(f"request parameters are {_describe(parameters)}, not an object", "")
    default_binary = (parameters or {}).get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise _bad(f"binary_data_output is {_describe(default_binary)}, not true or false", "")
    if outputs is None:
        return tuple(Wanted(name, default_binary) for name in DEFAULT_OUTPUTS)
    if not isinstance(outputs, list) or not outputs:
        raise _bad(f"outputs is {_describe(outputs)}, not a list of outputs",
                   f"name some of {', '.join(OUTPUTS)}, or leave outputs out")
    wanted: dict[str, Wanted] = {}
    for item in outputs:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in OUTPUTS:
            raise _bad(f"unknown output {_describe(name)}", f"name one of {', '.join(OUTPUTS)}")
        options = item.get("parameters") or {}
        binary = options.get("binary_data", default_binary) if isinstance(options, dict) else None
        if not isinstance(binary, bool):
            raise _bad(f"output {name}: binary_data is {_describe(binary)}, not true or false", "")
        wanted[name] = Wanted(name, binary)
    return tuple(wanted.values())


# ----------------------------------------------------------------------------------- answers
@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray


def output_tensors(request: InferRequest, predictions: Sequence[Any],
                   counts: Sequence[Sequence[int]], multilabel: bool) -> list[Tensor]:
    """The requested outputs of a batch, in the order the request named them.

    ``predictions`` are :class:`seg_core.inference.Prediction` (``mask``, ``confidence``);
    ``counts`` the rows' ``class_pixel_counts``.  Images of different sizes are padded to the
    largest (module docstring).
    """
    sizes = np.asarray([p.mask.shape[-2:] for p in predictions], dtype=np.int32)
    height, width = (int(v) for v in sizes.max(axis=0))
    tensors = []
    for wanted in request.outputs:
        if wanted.name == MASK:
            planes = predictions[0].mask.shape[:-2]
            array = np.full((len(predictions), *planes, height, width), MASK_PAD, np.uint8)
            for index, prediction in enumerate(predictions):
                h, w = prediction.mask.shape[-2:]
                array[index, ..., :h, :w] = prediction.mask
        elif wanted.name == CONFIDENCE:
            array = np.full((len(predictions), height, width), np.nan, np.float32)
            for index, prediction in enumerate(predictions):
                h, w = prediction.confidence.shape
                array[index, :h, :w] = prediction.confidence
        elif wanted.name == COUNTS:
            array = np.asarray(counts, dtype=np.int64)
        else:
            array = sizes
        tensors.append(Tensor(wanted.name, _DTYPES[wanted.name][0], list(array.shape), array))
    return tensors


def infer_response(request: InferRequest, tensors: Sequence[Tensor], *, model_name: str,
                   model_version: str, headers: Mapping[str, str]) -> Response:
    """The infer answer: JSON, or (any binary output) JSON then the binary tensors in order."""
    binary = {wanted.name for wanted in request.outputs if wanted.binary}
    outputs, chunks = [], []
    for tensor in tensors:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": tensor.shape}
        if tensor.name in binary:
            data = np.ascontiguousarray(tensor.array, dtype=tensor.array.dtype.newbyteorder("<"))
            chunks.append(data.tobytes())
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            entry["data"] = _json_data(tensor.array)
        outputs.append(entry)
    header = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if request.id is not None:
        header["id"] = request.id
    text = json.dumps(header, separators=(",", ":")).encode()
    if not chunks:
        return Response(text, media_type="application/json", headers=dict(headers))
    return Response(b"".join([text, *chunks]), media_type="application/octet-stream",
                    headers={**headers, HEADER_LENGTH: str(len(text))})


def _json_data(array: np.ndarray) -> list:
    flat = array.ravel()
    if flat.dtype.kind == "f":   # NaN (padding) is not JSON: null stands for it
        return [None if math.isnan(v) else v for v in flat.tolist()]
    return flat.tolist()


def model_metadata(*, name: str, version: str, class_names: Sequence[str],
                   multilabel: bool) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the tensors this model takes and answers."""
    classes = len(class_names)
    mask_shape = [-1, classes, -1, -1] if multilabel else [-1, -1, -1]
    return {
        "name": name, "versions": [version], "platform": "rayseg",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": MASK, "datatype": "UINT8", "shape": mask_shape},
                    {"name": CONFIDENCE, "datatype": "FP32", "shape": [-1, -1, -1]},
                    {"name": COUNTS, "datatype": "INT64", "shape": [-1, classes]},
                    {"name": SIZE, "datatype": "INT32", "shape": [-1, 2]}],
        # Not in the protocol's schema; clients ignore it.  IMAGE also takes UINT8 [N,H,W,C].
        "parameters": {"class_names": list(class_names), "multilabel": multilabel,
                       "image_datatypes": ["BYTES", "UINT8"]},
    }


def server_metadata(version: str) -> dict[str, Any]:
    """``GET /v2``."""
    return {"name": "rayseg", "version": version, "extensions": list(EXTENSIONS)}


def check_model(name: str, version: str | None, *, served_name: str,
                served_version: str) -> None:
    """404 unless the path names the served model (and, when it names one, its version)."""
    if name != served_name:
        raise RequestRefused(404, "unknown_model",
                             f"this endpoint serves model {served_name!r}, not {name[:100]!r}",
                             f"call /v2/models/{served_name}/infer")
    if version is not None and version != served_version:
        raise RequestRefused(404, "unknown_version",
                             f"this endpoint serves {served_name!r} version "
                             f"{served_version!r}, not {version[:100]!r}",
                             f"call /v2/models/{served_name}/versions/{served_version}/infer, "
                             f"or leave the version out")


def error_response(refused: RequestRefused, request_id: str) -> JSONResponse:
    """The protocol's error body, ``{"error": "..."}``, with rayseg's reason and hint beside it."""
    message = f"{refused.reason}: {refused.detail}" + (f" ({refused.hint})" if refused.hint
                                                      else "")
    body: dict[str, Any] = {"error": message, "reason": refused.reason,
                            "request_id": request_id}
    headers = None
    if refused.retry_after_s is not None:
        body["retry_after_s"] = refused.retry_after_s
        headers = {"Retry-After": str(refused.retry_after_s)}
    return JSONResponse(body, status_code=refused.status, headers=headers)


# --------------------------------------------------------------------------------- internals
def _bad(detail: str, hint: str) -> RequestRefused:
    return RequestRefused(400, "bad_request", detail, hint)


def _describe(value: Any) -> str:
    """A short, safe rendering of a client's value for a message."""
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
