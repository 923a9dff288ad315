"""The one exception type for bad input, with a machine-readable reason and a human hint.

Batch jobs turn it into a quarantine row; the online endpoint turns it into a 4xx.  Every message
names the file (``source``), says what is wrong and what to do.
"""
from __future__ import annotations

from typing import Literal

Reason = Literal[
    "empty_file",      # zero bytes
    "corrupt",         # bytes are not a decodable image of a known format
    "truncated",       # the file ends early
    "not_an_image",    # text, zip, ... : no image signature at all
    "unsupported_format",
    "too_many_pixels", # decompression-bomb guard
    "too_large",       # segmenting it needs more memory (or work) than the budget allows
    "multi_page",      # a multi-page TIFF without a page chosen (Preprocessing.tiff_page)
    "lossy_mask",      # JPEG (or other lossy) mask
    "missing_mask",    # manifest names a mask that does not exist / no mask paired
    "missing_image",
    "size_mismatch",   # image and mask H x W differ
    "unknown_label",   # mask value outside the declared classes / palette
    "bad_channels",    # multi-label mask with the wrong number of channels
    "path_refused",    # a manifest path the ingest policy refuses (outside its root, /proc, ...)
    "not_a_file",      # a directory, device, pipe or socket where a file was named
    "unreadable",      # the file exists but cannot be read (permissions, I/O error)
    "source_mismatch", # a prediction made from another image than the one scored against it
]

HTTP_STATUS: dict[str, int] = {
    "empty_file": 422,
    "corrupt": 422,
    "truncated": 422,
    "not_an_image": 415,
    "unsupported_format": 415,
    "too_many_pixels": 413,
    "too_large": 413,
    "multi_page": 422,
    "lossy_mask": 422,
    "missing_mask": 422,
    "missing_image": 422,
    "size_mismatch": 422,
    "unknown_label": 422,
    "bad_channels": 422,
    "path_refused": 422,
    "not_a_file": 422,
    "unreadable": 422,
    "source_mismatch": 422,
}


class InputError(ValueError):
    """Bad input data.  ``reason`` is a stable code; ``hint`` says how to fix it."""

    def __init__(self, reason: Reason, detail: str, *, source: str = "<bytes>", hint: str = ""):
        self.reason = reason
        self.detail = detail
        self.source = source
        self.hint = hint
        text = f"{source}: {reason}: {detail}"
        super().__init__(f"{text}. {hint}" if hint else text)

    def with_source(self, source: str) -> "InputError":
        """The same error, naming ``source`` (callers that know the URI add it)."""
        return InputError(self.reason, self.detail, source=source, hint=self.hint)

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.reason, 422)
