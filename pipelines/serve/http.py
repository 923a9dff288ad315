"""HTTP edges of the online endpoint: reading uploads within limits, API keys, response bodies.

Plain functions over Starlette requests, kept apart from the deployment so that the route handlers
in :mod:`pipelines.serve.app` read as "read -> decode -> predict -> encode -> answer".
Every refusal becomes a :class:`RequestRefused` carrying an HTTP status and a message that says
what arrived, what was expected and how to fix it; nothing here raises anything else on bad input.
Bad input is a 4xx; the one 5xx is 503 with ``Retry-After`` (:meth:`RequestRefused.unavailable`),
while the replica's prediction log cannot take rows.
"""
import base64
import hmac
import json
import uuid
from typing import Any, AsyncIterator, Mapping

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from seg_core.errors import InputError

API_KEY_HEADER = "X-API-Key"
MAX_FORM_FIELDS = 16
MAX_REQUEST_ID_CHARS = 128


class RequestRefused(Exception):
    """A refusal that ends the request with ``status`` (4xx, or 503) and a JSON body."""

    def __init__(self, status: int, reason: str, detail: str, hint: str = "",
                 retry_after_s: int | None = None) -> None:
        super().__init__(f"{status} {reason}: {detail}")
        self.status, self.reason, self.detail, self.hint = status, reason, detail, hint
        self.retry_after_s = retry_after_s

    @classmethod
    def unavailable(cls, reason: str, detail: str, retry_after_s: float) -> "RequestRefused":
        """503: the request was not served (nor logged); the client may retry after a while."""
        return cls(503, reason, detail, hint="retry later with the same X-Request-Id",
                   retry_after_s=max(1, int(retry_after_s)))

    @classmethod
    def from_input_error(cls, error: InputError) -> "RequestRefused":
        """413 / 415 / 422 from the decoder's stable reason code."""
        return cls(error.http_status, error.reason, error.detail, error.hint)


def check_api_key(request: Request, expected: str | None) -> None:
    """Refuse with 401 unless ``expected`` is None or the request carries it in ``X-API-Key``."""
    if expected is None:
        return
    given = request.headers.get(API_KEY_HEADER, "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        why = "wrong" if given else "missing"
        raise RequestRefused(401, "unauthorized", f"{API_KEY_HEADER} header is {why}",
                             hint=f"send the key in the {API_KEY_HEADER} header")


async def read_image_bytes(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """The uploaded image and its name: the raw body, or the file part of a multipart form.

    Refuses with 413 when the body is larger than ``max_bytes`` (:func:`read_body`) and with
    422 when a multipart body has no file part or does not parse.
    """
    body = await read_body(request, max_bytes)
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        return await _multipart_file(request, body, max_bytes)
    return body, "body"


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 past ``max_bytes`` (on ``Content-Length`` first, then
    while streaming, so an oversized upload is never held in memory whole)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise RequestRefused(415, "unsupported_encoding",
                             f"Content-Encoding {encoding[:40]!r} is not accepted",
                             hint="send the body uncompressed (images are compressed already)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(len(body), max_bytes)
    return bytes(body)


def request_id(request: Request) -> str:
    """The client's ``X-Request-Id`` when it is 1 to :data:`MAX_REQUEST_ID_CHARS` visible ASCII
    characters, else a fresh one: the id is stored in Parquet, so a header holding any bytes a
    client can send (not UTF-8, control characters, 10 KB) never reaches it, even on a cluster
    that runs without :class:`HeaderGuard`."""
    given = request.headers.get("x-request-id", "")
    if _header_ok(b"x-request-id", given.encode("latin-1")):
        return given
    return uuid.uuid4().hex


class HeaderGuard:
    """ASGI middleware in front of Ray Serve's own request handling (the proxy actor's, and each
    replica's direct ingress behind HAProxy): drops an ``X-Request-Id`` that is not 1 to
    :data:`MAX_REQUEST_ID_CHARS` visible ASCII characters, so Ray generates one instead, and any
    header whose value is not UTF-8.  Ray decodes the request id (and its session and
    multiplexing headers) as UTF-8 before the app runs, so without this a request id of bytes
    such as ``\\xff`` is answered 500 and a 10 KB one is echoed back whole.

    Installed by :func:`ingress_middlewares`, which Ray calls in those processes when
    ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names it (``ensure_ray`` sets it for a local
    Ray; ``infra/rayservice.yaml`` on every pod).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            kept = [(name, value) for name, value in headers if _header_ok(name, value)]
            if len(kept) != len(headers):
                scope = {**scope, "headers": kept}
        await self.app(scope, receive, send)


def ingress_middlewares() -> list:
    """``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=pipelines.serve.http:ingress_middlewares``."""
    from starlette.middleware import Middleware

    return [Middleware(HeaderGuard)]


def explain_params(request: Request, class_names: tuple[str, ...]) -> tuple[int, str]:
    """``POST /v1/explain``'s ``class`` (a name or an index) and ``method``, or a 422 that
    lists the choices."""
    from seg_core.explain import METHODS

    given = request.query_params.get("class", "")
    method = request.query_params.get("method", "gradcam")
    if method not in METHODS:
        raise RequestRefused(422, "unknown_method", f"method {method[:40]!r} is not one of "
                             f"{', '.join(METHODS)}", hint="e.g. ?method=gradcam")
    if given in class_names:
        return class_names.index(given), method
    if given.isascii() and given.isdigit() and int(given) < len(class_names):
        return int(given), method
    raise RequestRefused(422, "unknown_class", f"class {given[:40]!r} is not one of this "
                         f"model's: {', '.join(class_names)}",
                         hint="name the class, e.g. ?class=" + class_names[-1])


def wants_png(request: Request) -> bool:
    """True when the client asks for the bare mask (``Accept: image/png``)."""
    return "image/png" in request.headers.get("accept", "").lower()


def error_response(refused: RequestRefused, request_id: str) -> JSONResponse:
    """The JSON body of every refusal: ``{error, detail, hint, request_id}`` (and, on a 503,
    ``retry_after_s`` and the ``Retry-After`` header)."""
    body: dict[str, Any] = {"error": refused.reason, "detail": refused.detail,
                            "hint": refused.hint, "request_id": request_id}
    headers = None
    if refused.retry_after_s is not None:
        body["retry_after_s"] = refused.retry_after_s
        headers = {"Retry-After": str(refused.retry_after_s)}
    return JSONResponse(body, status_code=refused.status, headers=headers)


def segment_body(encoded: Mapping[str, Any], *, request_id: str, model: Mapping[str, str],
                 class_names: tuple[str, ...], multilabel: bool, height: int, width: int,
                 timing_ms: Mapping[str, float]) -> dict[str, Any]:
    """The JSON answer of ``POST /v1/segment`` from :func:`seg_core.inference.encode_prediction`.

    ``class_areas`` maps each class name to its pixel count, its fraction of the image and its
    mean confidence (``class_mean_confidence`` of ``encode_prediction``).  Multi-label answers add
    ``class_mask_pngs``: one binary PNG (0/255) per class, in class order.
    """
    total = max(height * width, 1)
    counts = encoded["class_pixel_counts"]
    confidence = encoded.get("class_mean_confidence") or [None] * len(counts)
    body: dict[str, Any] = {
        "request_id": request_id,
        "model": dict(model),
        "height": height,
        "width": width,
        "multilabel": multilabel,
        "mask_png": _b64(encoded["mask_png"]),
        "class_names": list(class_names),
        "class_pixel_counts": list(counts),
        "class_areas": {name: {"pixels": n, "fraction": round(n / total, 6),
                               "mean_confidence": None if c is None else round(c, 6)}
                        for name, n, c in zip(class_names, counts, confidence)},
        "mean_confidence": encoded["mean_confidence"],
        "timing_ms": {k: round(v, 3) for k, v in timing_ms.items()},
    }
    if multilabel:
        body["class_mask_pngs"] = [_b64(png) for png in encoded["class_mask_pngs"]]
    if encoded.get("confidence_png") is not None:
        body["confidence_png"] = _b64(encoded["confidence_png"])
    if encoded.get("objects") is not None:   # the endpoint's `instances` is set
        body["objects"] = {"count": len(encoded["objects"]), "table": encoded["objects"]}
        body["instance_png"] = _b64(encoded["instance_png"])
    return body


def json_bytes(body: Mapping[str, Any]) -> bytes:
    """Compact JSON (built in a worker thread: base64 masks can be large)."""
    return json.dumps(body, separators=(",", ":")).encode()


def server_timing(timing_ms: Mapping[str, float]) -> str:
    """``Server-Timing`` header value, e.g. ``decode;dur=1.2, infer;dur=8.0``."""
    return ", ".join(f"{name};dur={value:.2f}" for name, value in timing_ms.items())


def png_response(png: bytes, headers: Mapping[str, str]) -> Response:
    return Response(content=png, media_type="image/png", headers=dict(headers))


# ------------------------------------------------------------------------------------ internals
async def _multipart_file(request: Request, body: bytes, max_bytes: int) -> tuple[bytes, str]:
    async def one_chunk() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, one_chunk(), max_files=1,
                             max_fields=MAX_FORM_FIELDS, max_part_size=max_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise RequestRefused(422, "bad_multipart", f"multipart body does not parse: {error}",
                             hint="send one file part, e.g. curl -F image=@photo.png") from error
    try:
        uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not uploads:
            raise RequestRefused(422, "missing_image", "multipart form has no file part",
                                 hint="send the image as a file part, e.g. -F image=@photo.png")
        return await uploads[0].read(), uploads[0].filename or "upload"
    finally:
        await form.close()


def _header_ok(name: bytes, value: bytes) -> bool:
    if name.lower() == b"x-request-id":
        return 0 < len(value) <= MAX_REQUEST_ID_CHARS and all(0x21 <= b <= 0x7E for b in value)
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _too_large(size: int, max_bytes: int) -> RequestRefused:
    return RequestRefused(413, "payload_too_large",
                          f"request body has {size} bytes, the limit is {max_bytes}",
                          hint="downscale or crop the image, or raise max_request_bytes")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
