"""Image references in prompt rows: find them (planning), then read and check them (on the replica).

An image is referred to by its encoded bytes (PNG, JPEG, ...) or by a path / URL string: a local
path, file://, s3:// (any URL dgbatch's storage reaches), or http(s):// when `input.allow_http_images`
is on. Planning only looks at the references: it counts images, refuses what the config forbids,
and never opens a file or a URL; the plan keeps the references (or the bytes) as the input had them.
The replica that runs the shard reads each image when it builds the row's request: a missing file,
bytes that are not an image, a corrupt image or one over the limits becomes that row's error.

In chat messages an image is a content part `{"type": "image", "image": bytes | str}` (or with the
reference under "url" or "path"); a text part is `{"type": "text", "text": str}`.
"""

from __future__ import annotations

import io
from typing import Any

from dgbatch.config import InputSection, StorageSection

ImageRef = bytes | str
HTTP_SCHEMES = ("http://", "https://")
_REF_KEYS = ("image", "url", "path")


class ImageError(ValueError):
    """This row's image cannot be used; the message says why (it becomes the row's error)."""


def part_ref(part: dict) -> ImageRef | None:
    """The image reference of an image content part (None when it has none)."""
    for key in _REF_KEYS:
        v = part.get(key)
        if isinstance(v, (bytes, bytearray, memoryview)):
            return bytes(v)
        if isinstance(v, str) and v:
            return v
    return None


def message_refs(messages: list[dict]) -> list[ImageRef | None]:
    """Every image part's reference, in the order the chat template renders them."""
    return [part_ref(p) for m in messages if isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, dict) and p.get("type") == "image"]


def row_refs(table, section: InputSection) -> list[list[ImageRef | None]]:
    """Per row, its image references in prompt order: input.image_column's value, or the messages' image
    parts (planning checks them; the replica reads them)."""
    if section.image_column and section.image_column in table.column_names:
        return [[v] if v is not None else [] for v in table.column(section.image_column).to_pylist()]
    if section.messages_column and section.messages_column in table.column_names:
        return [message_refs(m) if m else [] for m in table.column(section.messages_column).to_pylist()]
    return [[] for _ in range(table.num_rows)]


def check_ref(ref: ImageRef | None, section: InputSection) -> str | None:
    """Why this reference cannot be read under the config (None: fine), without touching it."""
    if ref is None:
        return "an image part has no image (set 'image' to the bytes, or 'image' / 'url' / 'path' to a path or URL)"
    if isinstance(ref, bytes):
        return None if ref else "image bytes are empty"
    if ref.lower().startswith(HTTP_SCHEMES) and not section.allow_http_images:
        return "image URL is http(s), which is off; set input.allow_http_images=true to fetch images over http(s)"
    return None


def check_refs(refs: list[ImageRef | None], section: InputSection) -> str | None:
    if len(refs) > section.max_images_per_row:
        return f"row has {len(refs)} images; input.max_images_per_row is {section.max_images_per_row}"
    for ref in refs:
        err = check_ref(ref, section)
        if err:
            return err
    return None


def describe(ref: ImageRef) -> str:
    """A reference for a message: a path / URL as given (no query string: it may hold a token), or the byte count."""
    if isinstance(ref, bytes):
        return f"<{len(ref)} bytes>"
    return repr(ref.split("?", 1)[0])


def read_bytes(ref: ImageRef, section: InputSection, storage: StorageSection | None) -> bytes:
    if isinstance(ref, bytes):
        return ref
    try:
        if ref.lower().startswith(HTTP_SCHEMES):
            if not section.allow_http_images:
                raise ImageError(check_ref(ref, section))
            import fsspec

            opener = fsspec.open(ref, "rb")  # fsspec's HTTP filesystem (needs aiohttp)
        else:
            from dgbatch.io.fs import filesystem

            fs, path = filesystem(ref, storage)
            opener = fs.open(path, "rb")
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"image {describe(ref)} not found") from None
    except (ImportError, OSError, ValueError) as e:
        raise ImageError(f"image {describe(ref)} cannot be read: {type(e).__name__}: {e}") from None
    # What fails one object (missing, refused, unreadable: OSErrors) is that row's error; what fails every
    # object (no credentials, an endpoint that does not answer: botocore's own errors) fails the shard,
    # which is retried and, once the job's storage settings are fixed, rerun.
    try:
        with opener as fh:
            return fh.read()
    except FileNotFoundError:
        raise ImageError(f"image {describe(ref)} not found") from None
    except (OSError, ValueError) as e:
        raise ImageError(f"image {describe(ref)} cannot be read: {type(e).__name__}: {e}") from None


def open_image(ref: ImageRef, section: InputSection, storage: StorageSection | None) -> Any:
    """The decoded RGB image; ImageError (missing, not an image, corrupt, over input.max_image_pixels)."""
    from PIL import Image, UnidentifiedImageError

    data = read_bytes(ref, section, storage)
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise ImageError(f"image {describe(ref)} is not an image file PIL can read") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"image {describe(ref)} cannot be opened: {e}") from None
    w, h = img.size
    if w * h > section.max_image_pixels:
        raise ImageError(f"image {describe(ref)} is {w}x{h} = {w * h} pixels; "
                         f"input.max_image_pixels is {section.max_image_pixels}")
    if w == 0 or h == 0:
        raise ImageError(f"image {describe(ref)} is empty ({w}x{h})")
    try:
        img.load()  # decode now: a truncated or corrupt file fails here, not in the processor
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"image {describe(ref)} is corrupt: {e}") from None


class RowImages:
    """The replica's side: each row's image references from the shard's carried input columns, read,
    checked and processed into the row's request (`dgbatch.vision.ImageProcessor`, loaded on first use)."""

    def __init__(self, section: InputSection, storage: StorageSection | None, model_dir):
        self.section, self.storage, self.model_dir = section, storage, model_dir
        self._processor = None

    def refs(self, table) -> list[list[ImageRef | None]]:
        """Per row of a shard, its image references in prompt order."""
        return row_refs(table, self.section)

    @property
    def processor(self):
        if self._processor is None:
            from dgbatch.vision import ImageProcessor

            self._processor = ImageProcessor(self.model_dir)
        return self._processor

    def request(self, row_id: str, prompt_ids: list[int], refs: list[ImageRef]):
        """The row's `Request` with its images; ImageError for any image this row cannot use."""
        from dgbatch.generation import Request, VisionInputs

        err = check_refs(refs, self.section)
        if err:
            raise ImageError(err)
        images = [open_image(r, self.section, self.storage) for r in refs]
        try:
            out = self.processor.process(images)
            ids = self.processor.expand(prompt_ids, out.soft_tokens)
        except Exception as e:  # noqa: BLE001 - the processor refusing one row's images fails only that row
            raise ImageError(f"the image processor refused the row's images: {type(e).__name__}: {e}") from None
        return Request(row_id, ids, vision=VisionInputs(out.pixel_values, out.position_ids, tuple(out.soft_tokens)))
