"""Train the shipped toy DiffusionGemma on the count / reverse / repeat family (seeded; CPU or GPU).

    python -m dgbatch.toy.train --out models/toy-diffusiongemma --steps 9000
    python -m dgbatch.toy.train --out M --device cuda --batch-size 256 --workers 4 --time-budget 300

With `--time-budget` the learning-rate schedule runs on whichever of steps and seconds is further
along, and training stops when either is spent (the steps reached are saved in training.json).

Objective (block diffusion with uniform noise, as the sampler sees it at inference): for each example
pick one canvas k of the response (+EOS, padded to the canvas); the encoder reads prompt +
response[:16k]; each canvas token is replaced by a uniform random token with probability t ~ U(0,1);
cross-entropy against the clean canvas. On half the steps a no-grad pass first produces logits that,
divided by a sampling temperature, are fed back as self-conditioning (what the sampler does).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dgbatch.toy.model import CANVAS_LENGTH, build_toy_model
from dgbatch.toy.tasks import make_example
from dgbatch.toy.tokenizer import build_tokenizer

# Count spans the most canvases and must learn where to stop, so it gets the most practice.
TASK_WEIGHTS = {"count": 0.5, "reverse": 0.3, "repeat": 0.2}
GENERATION_DEFAULTS = {
    "max_new_tokens": 128,
    "max_denoising_steps": 32,
    "t_min": 0.05,
    "t_max": 0.1,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "entropy_bound": 0.1,
}


def encode_example(tok, ex) -> tuple[list[int], list[int]]:
    prompt = tok.apply_chat_template([{"role": "user", "content": ex.prompt}], add_generation_prompt=True)["input_ids"]
    answer = tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    answer += [tok.pad_token_id] * (-len(answer) % CANVAS_LENGTH)
    return prompt, answer


def make_batches(tok, rng: random.Random, batch_size: int, vocab: int, gen: torch.Generator, pool: int = 4,
                 eos_canvas_p: float = 0.35):
    """`pool` batches whose rows are grouped by context length, so little compute goes to padding."""
    tasks, weights = zip(*TASK_WEIGHTS.items())
    rows = []
    for _ in range(batch_size * pool):
        prompt, answer = encode_example(tok, make_example(rng.choices(tasks, weights)[0], rng))
        n_canvas = len(answer) // CANVAS_LENGTH
        # Often the canvas that holds EOS: stopping is where errors concentrate.
        k = n_canvas - 1 if rng.random() < eos_canvas_p else rng.randrange(n_canvas)
        rows.append((prompt + answer[: k * CANVAS_LENGTH], answer[k * CANVAS_LENGTH : (k + 1) * CANVAS_LENGTH]))
    rows.sort(key=lambda r: len(r[0]))
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    rng.shuffle(batches)
    for batch in batches:
        yield collate(tok, batch, vocab, gen)


class BatchStream(torch.utils.data.IterableDataset):
    """Endless training batches; with DataLoader workers each worker draws from its own seeds."""

    def __init__(self, seed: int, batch_size: int, eos_canvas_p: float, task_weights: dict):
        self.seed, self.batch_size, self.eos_canvas_p, self.task_weights = seed, batch_size, eos_canvas_p, task_weights

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        seed = self.seed * 1000 + (info.id if info else 0)
        TASK_WEIGHTS.update(self.task_weights)
        tok, rng, gen = build_tokenizer(), random.Random(seed), torch.Generator().manual_seed(seed)
        while True:
            yield from make_batches(tok, rng, self.batch_size, len(tok), gen, eos_canvas_p=self.eos_canvas_p)


def collate(tok, batch, vocab: int, gen: torch.Generator):
    width = max(len(c) for c, _ in batch)
    ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, (c, _) in enumerate(batch):  # left padding, as at inference
        ids[i, width - len(c) :] = torch.tensor(c)
        mask[i, width - len(c) :] = True
    clean = torch.tensor([t for _, t in batch])
    t = torch.rand(len(batch), 1, generator=gen)
    noise = torch.randint(0, vocab, clean.shape, generator=gen)
    noisy = torch.where(torch.rand(clean.shape, generator=gen) < t, noise, clean)
    return ids, mask, noisy, clean


def forward(model, ids, mask, canvas, sc_logits=None):
    dec_mask = F.pad(mask, (0, CANVAS_LENGTH), value=True)
    return model(
        input_ids=ids,
        attention_mask=mask,
        decoder_input_ids=canvas,
        decoder_attention_mask=dec_mask,
        self_conditioning_logits=sc_logits,
    ).logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=9000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=1000)
    ap.add_argument("--init-from", type=Path, help="continue from this checkpoint instead of random weights")
    ap.add_argument("--count-weight", type=float, default=TASK_WEIGHTS["count"])
    ap.add_argument("--start-step", type=int, default=0, help="with --init-from: resume the schedule here")
    ap.add_argument("--eos-canvas-p", type=float, default=0.35, help="extra chance to train on the EOS canvas")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes making batches")
    ap.add_argument("--time-budget", type=float, help="seconds; the schedule follows steps or time, whichever leads")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    rng = random.Random(args.seed + args.start_step)
    tok = build_tokenizer()
    vocab = len(tok)
    TASK_WEIGHTS["count"] = args.count_weight
    stream = BatchStream(args.seed + args.start_step, args.batch_size, args.eos_canvas_p, dict(TASK_WEIGHTS))
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=args.workers, pin_memory=args.device.startswith("cuda"),
        prefetch_factor=8 if args.workers else None,
    )
    if args.init_from:
        from transformers import DiffusionGemmaForBlockDiffusion

        model = DiffusionGemmaForBlockDiffusion.from_pretrained(args.init_from, use_safetensors=True)
    else:
        model = build_toy_model(vocab, hidden=args.hidden, layers=args.layers)
    batches = iter(loader)  # workers fork before CUDA initialises
    model.to(args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 200
    start, ema = time.time(), None

    def progress(step: int) -> float:
        """Fraction of training done: by steps, or by seconds when a time budget leads."""
        p = (step - warmup) / max(1, args.steps - warmup)
        if args.time_budget:
            p = max(p, (time.time() - start) / args.time_budget)
        return min(1.0, p)

    def lr_at(step: int) -> float:
        if args.start_step and step < args.start_step + 100:  # fresh optimizer moments: warm up again
            return lr_cosine(step) * (step - args.start_step + 1) / 100
        return lr_cosine(step)

    def lr_cosine(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress(step))))

    step = args.start_step
    for step in range(args.start_step, args.steps):
        if args.time_budget and time.time() - start > args.time_budget:
            step -= 1
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, mask, noisy, clean = (t.to(args.device, non_blocking=True) for t in next(batches))
        sc = None
        if rng.random() < 0.5:
            with torch.no_grad():
                temp = rng.uniform(0.05, 0.8)
                sc = forward(model, ids, mask, noisy) / temp
        logits = forward(model, ids, mask, noisy, sc)
        loss = F.cross_entropy(logits.reshape(-1, vocab), clean.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.detach() if ema is None else 0.98 * ema + 0.02 * loss.detach()  # no host sync per step
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {ema.item():.4f} lr {lr_at(step):.2e} {time.time() - start:.0f}s", flush=True)
        if (step + 1) % args.save_every == 0:
            save(model, tok, args.out, {"step": step + 1, **vars(args), "out": str(args.out), "loss_ema": ema.item()})
    ema = float(ema) if ema is not None else None
    print(f"done at step {step + 1} loss {ema} {time.time() - start:.0f}s", flush=True)
    save(model.cpu(), tok, args.out, {"step": step + 1, **vars(args), "out": str(args.out), "loss_ema": ema,
                                     "seconds": round(time.time() - start)})


def save(model, tok, out: Path, meta: dict) -> None:
    from transformers import DiffusionGemmaGenerationConfig
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    out.mkdir(parents=True, exist_ok=True)
    d = dict(GENERATION_DEFAULTS)
    model.generation_config = DiffusionGemmaGenerationConfig(
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=d.pop("entropy_bound")),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        **d,
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
