"""Grade a toy checkpoint with transformers' own API and its default sampling settings.

    python -m dgbatch.toy.evaluate models/toy-diffusiongemma --n 300 --seed 1234

Loads through `AutoTokenizer` / `DiffusionGemmaForBlockDiffusion.from_pretrained` exactly as a
user would, runs `model.generate` on left-padded batches, and reports exact-match accuracy per task
and mean tokens_per_forward.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dgbatch.toy.tasks import TASKS, sample_examples


def load(path: str):
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    tok = AutoTokenizer.from_pretrained(path)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, use_safetensors=True).eval()
    return tok, model


@torch.inference_mode()
def evaluate(path: str, n: int, seed: int, batch_size: int = 32) -> dict:
    tok, model = load(path)
    examples = sample_examples(n, seed)
    order = sorted(range(n), key=lambda i: len(examples[i].prompt))  # similar lengths share a batch
    outputs: dict[int, tuple[str, float]] = {}
    torch.manual_seed(seed)
    t0 = time.time()
    for s in range(0, n, batch_size):
        idx = order[s : s + batch_size]
        chats = [[{"role": "user", "content": examples[i].prompt}] for i in idx]
        enc = tok.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                      return_dict=True)
        out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], return_dict_in_generate=True)
        new = out.sequences[:, enc["input_ids"].shape[1] :]
        for j, i in enumerate(idx):
            ids = new[j].tolist()
            if tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id)]
            outputs[i] = (tok.decode(ids, skip_special_tokens=True), float(out.tokens_per_forward[j]))
    per_task = {t: [0, 0] for t in TASKS}
    for i, ex in enumerate(examples):
        per_task[ex.task][0] += outputs[i][0] == ex.answer
        per_task[ex.task][1] += 1
    correct = sum(c for c, _ in per_task.values())
    return {
        "n": n,
        "seed": seed,
        "accuracy": correct / n,
        "per_task": {t: c / max(k, 1) for t, (c, k) in per_task.items()},
        "mean_tokens_per_forward": sum(tpf for _, tpf in outputs.values()) / n,
        "seconds": round(time.time() - t0, 1),
        "failures": [(examples[i].prompt, outputs[i][0]) for i in range(n) if outputs[i][0] != examples[i].answer][:10],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    print(json.dumps(evaluate(args.path, args.n, args.seed, args.batch_size), indent=2))


if __name__ == "__main__":
    main()
