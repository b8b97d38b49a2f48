"""The `read` task's images: an integer 0-999 drawn in black, at a random position, on a white 64x32
image, in PIL's built-in default font. Training, the tests and the demo data all draw them here.

    python -m dgbatch.toy.images OUT_DIR --n 20 --seed 0     # PNG files NNNN.png and labels.csv
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

IMAGE_SIZE = (64, 32)  # width, height
MAX_NUMBER = 999


def draw_number(n: int, rng: random.Random, size: tuple[int, int] = IMAGE_SIZE):
    """A white RGB image of `size` with `n` in black at a random place where it fits whole."""
    return draw_number_placed(n, rng, size)[0]


def draw_number_placed(n: int, rng: random.Random, size: tuple[int, int] = IMAGE_SIZE):
    """(image, centres): `draw_number`'s image (the same rng draws) and each character's centre (x, y) in pixels."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    text = str(n)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = rng.randint(-left, size[0] - right)
    y = rng.randint(-top, size[1] - bottom)
    draw.text((x, y), text, fill="black", font=font)
    centres = [(x + draw.textlength(text[:i], font=font) + draw.textlength(c, font=font) / 2, y + (top + bottom) / 2)
               for i, c in enumerate(text)]
    return img, centres


def random_number_image(rng: random.Random):
    """(n, image) with n uniform in 0..999."""
    n = rng.randint(0, MAX_NUMBER)
    return n, draw_number(n, rng)


def read_table(rows: int, seed: int, folder: Path | None = None, text_rows: int = 0):
    """`read` prompts as an input table: columns prompt ("read", or a text-family prompt), image (PNG bytes,
    or with `folder` the path of a PNG written there; null for the `text_rows` text-family rows), task, expected."""
    import pyarrow as pa

    from dgbatch.toy.tasks import READ_PROMPT, sample_examples

    rng = random.Random(seed)
    cols: dict[str, list] = {"prompt": [], "image": [], "task": [], "expected": []}
    for i in range(rows):
        number, img = random_number_image(rng)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{i:05d}.png")
            ref = str((folder / f"{i:05d}.png").resolve())
        else:
            ref = png_bytes(img)
        for k, v in zip(cols, (READ_PROMPT, ref, "read", str(number))):
            cols[k].append(v)
    for ex in sample_examples(text_rows, seed):
        for k, v in zip(cols, (ex.prompt, None, ex.task, ex.answer)):
            cols[k].append(v)
    return pa.table({"prompt": cols["prompt"], "image": pa.array(cols["image"], pa.string() if folder else pa.binary()),
                     "task": cols["task"], "expected": cols["expected"]})


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    lines = ["file,number"]
    for i in range(args.n):
        n, img = random_number_image(rng)
        img.save(args.out / f"{i:04d}.png")
        lines.append(f"{i:04d}.png,{n}")
    (args.out / "labels.csv").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
