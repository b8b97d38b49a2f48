"""Train the shipped toy DiffusionGemma on the count / reverse / repeat family and the `read` vision task
(seeded; CPU or GPU).

    python -m dgbatch.toy.train --out models/toy-diffusiongemma --steps 9000
    python -m dgbatch.toy.train --out M --device cuda --batch-size 256 --workers 4 --time-budget 300
    python -m dgbatch.toy.train --out M --grow-from OLD ...   # OLD: a text-only toy (102 tokens, 1-layer tower)

With `--time-budget` the learning-rate schedule runs on whichever of steps and seconds is further
along, and training stops when either is spent (the steps reached are saved in training.json).

Objective (block diffusion with uniform noise, as the sampler sees it at inference): for each example
pick one canvas k of the response (+EOS, padded to the canvas); the encoder reads prompt +
response[:16k]; each canvas token is replaced by a uniform random token with probability t ~ U(0,1);
cross-entropy against the clean canvas. On half the steps a no-grad pass first produces logits that,
divided by a sampling temperature, are fed back as self-conditioning (what the sampler does).
A `read` example's image goes through the vision tower in the same forward, its soft tokens replace
the prompt's image tokens, and they attend to each other both ways (the encoder mask `generate`
builds from `mm_token_type_ids`): the vision tower and the text model train together.

`--grow-from` starts from a text-only toy: its weights are copied, the embedding (tied with the LM
head) gains zero rows for the image tokens appended to the vocabulary (so text prompts generate as
before), and the vision tower starts fresh.
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

from dgbatch.toy.model import CANVAS_LENGTH, IMAGE_PROCESSOR, build_toy_model
from dgbatch.toy.tasks import make_example
from dgbatch.toy.tokenizer import build_tokenizer
from dgbatch.vision import ImageTokens, expand_placeholders, mm_token_type_ids

# Count spans the most canvases and must learn where to stop, so it gets the most practice.
TASK_WEIGHTS = {"count": 0.5, "reverse": 0.3, "repeat": 0.2, "read": 0.0}
GENERATION_DEFAULTS = {
    "max_new_tokens": 128,
    "max_denoising_steps": 32,
    "t_min": 0.05,
    "t_max": 0.1,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "entropy_bound": 0.1,
}


def image_processor():
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(**IMAGE_PROCESSOR)


def image_token_ids(tok) -> ImageTokens:
    return ImageTokens(tok.image_token_id, tok.convert_tokens_to_ids(tok.boi_token),
                       tok.convert_tokens_to_ids(tok.eoi_token), **IMAGE_PROCESSOR)


def encode_example(tok, ex, processor=None):
    """(prompt ids, answer ids padded to whole canvases, pixel inputs or None) for one example."""
    prompt = tok.apply_chat_template(ex.messages(), add_generation_prompt=True)["input_ids"]
    vision = None
    if ex.image is not None:
        out = (processor or image_processor())([ex.image], return_tensors="pt")
        prompt = expand_placeholders(prompt, [int(n) for n in out["num_soft_tokens_per_image"]], image_token_ids(tok))
        vision = (out["pixel_values"], out["image_position_ids"])
    answer = tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    answer += [tok.pad_token_id] * (-len(answer) % CANVAS_LENGTH)
    return prompt, answer, vision


def make_batches(tok, rng: random.Random, batch_size: int, vocab: int, gen: torch.Generator, pool: int = 8,
                 eos_canvas_p: float = 0.35):
    """`pool` batches whose rows are grouped by context length, so little compute goes to padding."""
    tasks, weights = zip(*TASK_WEIGHTS.items())
    processor = image_processor()
    rows = []
    for _ in range(batch_size * pool):
        prompt, answer, vision = encode_example(tok, make_example(rng.choices(tasks, weights)[0], rng), processor)
        n_canvas = len(answer) // CANVAS_LENGTH
        # Often the canvas that holds EOS: stopping is where errors concentrate.
        k = n_canvas - 1 if rng.random() < eos_canvas_p else rng.randrange(n_canvas)
        rows.append((prompt + answer[: k * CANVAS_LENGTH], answer[k * CANVAS_LENGTH : (k + 1) * CANVAS_LENGTH],
                     vision))
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
    """(ids, mask, noisy canvas, clean canvas, pixel values or None, image positions or None)."""
    width = max(len(c) for c, _, _ in batch)
    ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, (c, _, _) in enumerate(batch):  # left padding, as at inference
        ids[i, width - len(c) :] = torch.tensor(c)
        mask[i, width - len(c) :] = True
    clean = torch.tensor([t for _, t, _ in batch])
    t = torch.rand(len(batch), 1, generator=gen)
    noise = torch.randint(0, vocab, clean.shape, generator=gen)
    noisy = torch.where(torch.rand(clean.shape, generator=gen) < t, noise, clean)
    images = [v for _, _, v in batch if v is not None]  # in row order: soft tokens fill image tokens row by row
    pixels = torch.cat([p for p, _ in images]) if images else None
    positions = torch.cat([q for _, q in images]) if images else None
    return ids, mask, noisy, clean, pixels, positions


def forward(model, ids, mask, canvas, sc_logits=None, pixels=None, positions=None):
    dec_mask = F.pad(mask, (0, CANVAS_LENGTH), value=True)
    if pixels is None:
        return model(
            input_ids=ids,
            attention_mask=mask,
            decoder_input_ids=canvas,
            decoder_attention_mask=dec_mask,
            self_conditioning_logits=sc_logits,
        ).logits
    # With images, the encoder mask is built as `generate` builds it (the model's forward would drop the
    # bidirectional image blocks), and the encoder runs the vision tower.
    enc = model.model.encoder
    mm = mm_token_type_ids(ids, model.config.image_token_id)
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    masks = enc.create_masks_for_generate(model.config, torch.empty((*ids.shape, 0), dtype=model.dtype, device=ids.device),
                                          mask, None, pos, mm)
    out = enc(input_ids=ids, pixel_values=pixels, image_position_ids=positions, attention_mask=masks,
              position_ids=pos, mm_token_type_ids=mm)
    return model(past_key_values=out.past_key_values, decoder_input_ids=canvas, decoder_attention_mask=dec_mask,
                 self_conditioning_logits=sc_logits).logits


def grow(old: Path, tok):
    """A new toy (this tokenizer's vocabulary, `toy_config`'s vision tower) holding `old`'s text weights."""
    from transformers import DiffusionGemmaForBlockDiffusion

    src = DiffusionGemmaForBlockDiffusion.from_pretrained(old, use_safetensors=True)
    text = src.config.text_config
    ids = image_token_ids(tok)
    model = build_toy_model(len(tok), hidden=text.hidden_size, layers=text.num_hidden_layers,
                            sliding_window=text.sliding_window, image_ids=(ids.boi_id, ids.eoi_id, ids.image_id))
    old_sd, new_sd = src.state_dict(), model.state_dict()
    with torch.no_grad():
        for name, value in new_sd.items():
            if ".vision_tower." in name or ".embed_vision." in name or name not in old_sd:
                continue
            if old_sd[name].shape == value.shape:
                value.copy_(old_sd[name])
            elif value.dim() == 2 and value.shape[1] == old_sd[name].shape[1]:  # embedding rows, new tokens appended
                value[: old_sd[name].shape[0]] = old_sd[name]
                value[old_sd[name].shape[0] :] = 0  # logit 0 and no self-conditioning weight: text rows as before
            else:
                raise ValueError(f"cannot grow {name}: {tuple(old_sd[name].shape)} -> {tuple(value.shape)}")
        table = model.model.encoder.vision_tower.patch_embedder.position_embedding_table
        table.normal_(0.0, 0.02)  # transformers initialises it to ones: every position alike
    model.tie_weights()
    return model


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
    ap.add_argument("--grow-from", type=Path, help="start from this text-only toy checkpoint (see above)")
    ap.add_argument("--count-weight", type=float, default=TASK_WEIGHTS["count"])
    ap.add_argument("--read-weight", type=float, default=TASK_WEIGHTS["read"], help="share of `read` examples")
    ap.add_argument("--task-weights", nargs="*", default=[], metavar="TASK=W", help="override any task's weight")
    ap.add_argument("--vision-lr-mult", type=float, default=1.0, help="the vision tower's lr, times --lr")
    ap.add_argument("--resume", action="store_true",
                    help="continue --out from its last save (weights, optimizer moments, step, elapsed seconds)")
    ap.add_argument("--start-step", type=int, default=0, help="with --init-from: resume the schedule here")
    ap.add_argument("--eos-canvas-p", type=float, default=0.35, help="extra chance to train on the EOS canvas")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes making batches")
    ap.add_argument("--time-budget", type=float, help="seconds; the schedule follows steps or time, whichever leads")
    args = ap.parse_args()

    elapsed = 0.0
    if args.resume and (args.out / "training.json").is_file():
        meta = json.loads((args.out / "training.json").read_text())
        args.init_from, args.grow_from, args.start_step = args.out, None, int(meta["step"])
        elapsed = float(meta.get("elapsed", 0.0))
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    rng = random.Random(args.seed + args.start_step)
    tok = build_tokenizer()
    vocab = len(tok)
    TASK_WEIGHTS["count"] = args.count_weight
    TASK_WEIGHTS["read"] = args.read_weight
    for item in args.task_weights:
        name, _, w = item.partition("=")
        if name not in TASK_WEIGHTS:
            ap.error(f"--task-weights: unknown task {name!r}")
        TASK_WEIGHTS[name] = float(w)
    stream = BatchStream(args.seed + args.start_step, args.batch_size, args.eos_canvas_p, dict(TASK_WEIGHTS))
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=args.workers, pin_memory=args.device.startswith("cuda"),
        prefetch_factor=8 if args.workers else None,
    )
    if args.init_from:
        from transformers import DiffusionGemmaForBlockDiffusion

        model = DiffusionGemmaForBlockDiffusion.from_pretrained(args.init_from, use_safetensors=True)
    elif args.grow_from:
        model = grow(args.grow_from, tok)
    else:
        model = build_toy_model(vocab, hidden=args.hidden, layers=args.layers)
    batches = iter(loader)  # workers fork before CUDA initialises
    model.to(args.device).train()
    vision = [p for n, p in model.named_parameters() if ".vision_tower." in n or ".embed_vision." in n]
    text = [p for n, p in model.named_parameters() if not (".vision_tower." in n or ".embed_vision." in n)]
    groups = [{"params": text, "mult": 1.0}, {"params": vision, "mult": args.vision_lr_mult}]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    resumed = load_optimizer(opt, args.out) if args.resume and args.init_from == args.out else False
    warmup = 200
    start, ema = time.time() - elapsed, None

    def progress(step: int) -> float:
        """Fraction of training done: by steps, or by seconds when a time budget leads."""
        p = (step - warmup) / max(1, args.steps - warmup)
        if args.time_budget:
            p = max(p, (time.time() - start) / args.time_budget)
        return min(1.0, p)

    def lr_at(step: int) -> float:
        if args.start_step and not resumed and step < args.start_step + 100:  # fresh optimizer moments: warm up again
            return lr_cosine(step) * (step - args.start_step + 1) / 100
        return lr_cosine(step)

    def lr_cosine(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress(step))))

    step = args.start_step - 1  # the last step done (none yet)
    for step in range(args.start_step, args.steps):
        if args.time_budget and time.time() - start > args.time_budget:
            step -= 1
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["mult"]
        ids, mask, noisy, clean, pixels, positions = (
            None if t is None else t.to(args.device, non_blocking=True) for t in next(batches))
        sc = None
        if rng.random() < 0.5:
            with torch.no_grad():
                temp = rng.uniform(0.05, 0.8)
                sc = forward(model, ids, mask, noisy, None, pixels, positions) / temp
        logits = forward(model, ids, mask, noisy, sc, pixels, positions)
        loss = F.cross_entropy(logits.reshape(-1, vocab), clean.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # Per group: the fresh vision tower's gradients run 30-100x the text model's, and one global clip
        # would shrink what the text model learns from `read` rows by as much.
        for g in opt.param_groups:
            torch.nn.utils.clip_grad_norm_(g["params"], 1.0)
        opt.step()
        ema = loss.detach() if ema is None else 0.98 * ema + 0.02 * loss.detach()  # no host sync per step
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {ema.item():.4f} lr {lr_at(step):.2e} {time.time() - start:.0f}s", flush=True)
        if (step + 1) % args.save_every == 0:
            save(model, tok, args.out, {"step": step + 1, **vars(args), "out": str(args.out), "loss_ema": ema.item(),
                                        "elapsed": round(time.time() - start, 1)})
            save_optimizer(opt, args.out)
    ema = float(ema) if ema is not None else None
    print(f"done at step {step + 1} loss {ema} {time.time() - start:.0f}s", flush=True)
    save(model.cpu(), tok, args.out, {"step": step + 1, **vars(args), "out": str(args.out), "loss_ema": ema,
                                     "seconds": round(time.time() - start), "elapsed": round(time.time() - start, 1)})
    save_optimizer(opt, args.out)


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
    save_processor_config(out)
    (out / "training.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")


OPTIMIZER_FILE = "optimizer.safetensors"  # training state only: not part of a shipped checkpoint


def save_optimizer(opt, out: Path) -> None:
    from safetensors.torch import save_file

    state = opt.state_dict()["state"]
    save_file({f"{i}.{k}": v.detach().cpu().reshape(v.shape).contiguous() for i, st in state.items()
               for k, v in st.items() if torch.is_tensor(v)}, out / OPTIMIZER_FILE)


def load_optimizer(opt, out: Path) -> bool:
    """AdamW moments saved by `save_optimizer`; False (fresh moments) if there are none."""
    from safetensors.torch import load_file

    if not (out / OPTIMIZER_FILE).is_file():
        return False
    flat = load_file(out / OPTIMIZER_FILE)
    sd = opt.state_dict()
    state: dict = {}
    for key, v in flat.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)
    return True


def save_processor_config(out: Path) -> None:
    """processor_config.json as transformers writes it for a Gemma4Processor: the image processor's settings
    (what `AutoImageProcessor` loads; dgbatch reads it for the image token counts) and the processor's."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    image = image_processor().to_dict()
    image["image_processor_type"] = "Gemma4ImageProcessor"
    image.pop("_processor_class", None)
    video = {"video_processor_type": "Gemma4VideoProcessor", **IMAGE_PROCESSOR}
    audio = Gemma4AudioFeatureExtractor().to_dict()
    audio.pop("_processor_class", None)
    cfg = {"processor_class": "Gemma4Processor", "image_seq_length": IMAGE_PROCESSOR["max_soft_tokens"],
           "image_processor": image, "video_processor": video, "feature_extractor": audio}
    (out / "processor_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")


if __name__ == "__main__":
    main()

