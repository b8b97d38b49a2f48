"""Grade a toy checkpoint with transformers' own API and its default sampling settings.

    python -m dgbatch.toy.evaluate models/toy-diffusiongemma --n 300 --seed 1234
    python -m dgbatch.toy.evaluate models/toy-diffusiongemma --n 210 --seed 1234 --read 200

Loads through `AutoTokenizer` / `DiffusionGemmaForBlockDiffusion.from_pretrained` exactly as a
user would, runs `model.generate` on left-padded batches, and reports exact-match accuracy per task
and mean tokens_per_forward. `accuracy` is over the text family (`--n` prompts); `--read N` also
grades N `read` prompts (an image and the word "read"; seeded by `--seed` too), which `generate`
gets with their `pixel_values`, `image_position_ids` and `mm_token_type_ids` from the checkpoint's
image processor (`dgbatch.vision`).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dgbatch.toy.tasks import TASKS, VISION_TASKS, sample_examples


def load(path: str):
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    tok = AutoTokenizer.from_pretrained(path)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, use_safetensors=True).eval()
    return tok, model


def _inputs(tok, processor, examples) -> dict:
    """generate's inputs for a batch: left-padded ids and mask, plus the images' tensors if any."""
    chats = [ex.messages() for ex in examples]
    if all(ex.image is None for ex in examples):
        return tok.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                       return_dict=True)
    enc = tok.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
    from dgbatch.vision import mm_token_type_ids

    images = processor.process([ex.image for ex in examples if ex.image is not None])
    rows, k = [], 0
    for text, ex in zip(enc, examples):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        n = 0 if ex.image is None else 1
        rows.append(processor.expand(ids, images.soft_tokens[k : k + n]))
        k += n
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": images.pixel_values,
            "image_position_ids": images.position_ids,
            "mm_token_type_ids": mm_token_type_ids(ids, processor.tokens.image_id)}


@torch.inference_mode()
def evaluate(path: str, n: int, seed: int, batch_size: int = 32, read: int = 0) -> dict:
    tok, model = load(path)
    examples = sample_examples(n, seed)
    if read:
        examples += sample_examples(read, seed, tasks=VISION_TASKS)
    processor = None
    if read:
        from pathlib import Path

        from dgbatch.vision import ImageProcessor

        processor = ImageProcessor(Path(path))
    total = len(examples)
    order = sorted(range(total), key=lambda i: (examples[i].image is not None, len(examples[i].prompt)))
    outputs: dict[int, tuple[str, float]] = {}
    torch.manual_seed(seed)
    t0 = time.time()
    for s in range(0, total, batch_size):
        idx = order[s : s + batch_size]
        enc = _inputs(tok, processor, [examples[i] for i in idx])
        width = enc["input_ids"].shape[1]
        out = model.generate(**enc, return_dict_in_generate=True)
        new = out.sequences[:, width:]
        for j, i in enumerate(idx):
            ids = new[j].tolist()
            if tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id)]
            outputs[i] = (tok.decode(ids, skip_special_tokens=True), float(out.tokens_per_forward[j]))
    per_task = {t: [0, 0] for t in TASKS + (VISION_TASKS if read else ())}
    for i, ex in enumerate(examples):
        per_task[ex.task][0] += outputs[i][0] == ex.answer
        per_task[ex.task][1] += 1
    correct = sum(c for t, (c, _) in per_task.items() if t in TASKS)
    return {
        "n": n,
        "seed": seed,
        "accuracy": correct / max(n, 1),
        "per_task": {t: c / max(k, 1) for t, (c, k) in per_task.items()},
        "mean_tokens_per_forward": sum(outputs[i][1] for i in range(n)) / max(n, 1),
        "seconds": round(time.time() - t0, 1),
        "failures": [(examples[i].task, examples[i].prompt if examples[i].image is None else examples[i].answer,
                      outputs[i][0]) for i in range(total) if outputs[i][0] != examples[i].answer][:20],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--n", type=int, default=300, help="text-family prompts")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--read", type=int, default=0, help="also grade this many `read` (image) prompts")
    args = ap.parse_args()
    print(json.dumps(evaluate(args.path, args.n, args.seed, args.batch_size, args.read), indent=2))


if __name__ == "__main__":
    main()
