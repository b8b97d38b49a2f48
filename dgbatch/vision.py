"""Images to model inputs, as the checkpoint's `Gemma4Processor` makes them.

`AutoProcessor.from_pretrained` cannot build a `Gemma4Processor` without torchvision (its video
processor needs it, even for images alone), so dgbatch does the processor's two image steps itself,
with the checkpoint's own parts: the image processor (`AutoImageProcessor`, from the checkpoint's
`processor_config.json`) turns each image into `pixel_values` / `image_position_ids` and a soft-token
count, and each image placeholder token in the prompt becomes `boi + image_token * count + eoi`
(`Gemma4Processor.replace_image_token`); `mm_token_type_ids` is 1 on the image tokens.

The number of soft tokens an image gets is at most `max_soft_tokens` (the processor resizes every
image to fill that budget), so planning can bound a prompt's length without reading its images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PROCESSOR_CONFIG = "processor_config.json"


@dataclass(frozen=True)
class ImageTokens:
    """The image token ids of a checkpoint and its image processor's size settings (no pixels needed)."""

    image_id: int
    boi_id: int
    eoi_id: int
    patch_size: int
    pooling_kernel_size: int
    max_soft_tokens: int

    @property
    def max_tokens_per_image(self) -> int:
        """Prompt tokens one image takes at most: its soft tokens and the boi / eoi around them."""
        return self.max_soft_tokens + 2

    def soft_tokens(self, height: int, width: int) -> int:
        """Soft tokens for an image of this size (the processor's aspect-preserving resize)."""
        from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

        k = self.pooling_kernel_size
        h, w = get_aspect_ratio_preserving_size(height, width, self.patch_size, self.max_soft_tokens * k * k, k)
        return (h // self.patch_size) * (w // self.patch_size) // (k * k)


def image_tokens(model_dir: Path) -> ImageTokens | None:
    """The checkpoint's image tokens, or None if it has no image processor (a text-only checkpoint)."""
    proc_file = model_dir / PROCESSOR_CONFIG
    if not proc_file.is_file():
        return None
    proc = json.loads(proc_file.read_text()).get("image_processor")
    if not isinstance(proc, dict):
        return None
    cfg = json.loads((model_dir / "config.json").read_text())
    return ImageTokens(
        image_id=int(cfg["image_token_id"]),
        boi_id=int(cfg["boi_token_id"]),
        eoi_id=int(cfg["eoi_token_id"]),
        patch_size=int(proc.get("patch_size", 16)),
        pooling_kernel_size=int(proc.get("pooling_kernel_size", 3)),
        max_soft_tokens=int(proc.get("max_soft_tokens", 280)),
    )


@dataclass
class ProcessedImages:
    """One row's images, ready for the vision tower."""

    pixel_values: object  # torch.Tensor [N, max_patches, 3 * patch_size**2] float32 in [0, 1]
    position_ids: object  # torch.LongTensor [N, max_patches, 2]: patch (x, y), (-1, -1) for padding
    soft_tokens: list[int]  # [N] soft tokens per image


class ImageProcessor:
    """The checkpoint's image processor plus the placeholder expansion (`Gemma4Processor`'s image half)."""

    def __init__(self, model_dir: Path, tokens: ImageTokens | None = None):
        from transformers import AutoImageProcessor

        self.tokens = tokens or image_tokens(model_dir)
        if self.tokens is None:
            raise ValueError(f"checkpoint {str(model_dir)!r} has no image processor ({PROCESSOR_CONFIG})")
        self.processor = AutoImageProcessor.from_pretrained(str(model_dir), trust_remote_code=False)

    def process(self, images: Sequence) -> ProcessedImages:
        """PIL images (any mode; converted to RGB as the processor does) -> pixel inputs."""
        out = self.processor(list(images), return_tensors="pt")
        return ProcessedImages(out["pixel_values"], out["image_position_ids"],
                               [int(n) for n in out["num_soft_tokens_per_image"]])

    def expand(self, ids: Sequence[int], soft_tokens: Sequence[int]) -> list[int]:
        """Replace the i-th image placeholder in `ids` by boi, soft_tokens[i] image tokens, eoi."""
        return expand_placeholders(ids, soft_tokens, self.tokens)


def expand_placeholders(ids: Sequence[int], soft_tokens: Sequence[int], t: ImageTokens) -> list[int]:
    out: list[int] = []
    n = 0
    for tok in ids:
        if tok == t.image_id:
            if n == len(soft_tokens):
                raise ValueError(f"the prompt has more image placeholders than images ({len(soft_tokens)})")
            out += [t.boi_id] + [t.image_id] * soft_tokens[n] + [t.eoi_id]
            n += 1
        else:
            out.append(tok)
    if n != len(soft_tokens):
        raise ValueError(f"the prompt has {n} image placeholders for {len(soft_tokens)} images")
    return out


def mm_token_type_ids(ids, image_id: int):
    """1 on image soft tokens, 0 elsewhere (what the processor returns; boi / eoi are text): same shape as ids."""
    return (ids == image_id).long()
