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

`--grow-from` starts from a toy's text weights (a text-only toy, or one already grown: its vision tower is
dropped): they are copied, the embedding (tied with the LM head) gets rows at the text rows' scale for the
image tokens appended to the vocabulary (`grow`), and the vision tower starts fresh.

`--stage vision` trains the vision tower and its embedder alone, on `read` images, against targets in the
text model's own embedding space (`train_vision`); no text weight changes and no text-model pass is paid
for. A joint stage after it, with the tower frozen (`--freeze-vision`), is where the text model learns to
read the digits it is shown: at a high learning rate first (it costs `count` its stopping), then a low one with
mostly text rows, which gives it back (BENCHMARKS.md, "Stage 3", has the shipped checkpoint's commands).
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

from dgbatch.toy.images import IMAGE_SIZE, MAX_NUMBER, draw_number_placed
from dgbatch.toy.model import CANVAS_LENGTH, IMAGE_PROCESSOR, build_toy_model
from dgbatch.toy.tasks import make_example
from dgbatch.toy.tokenizer import MULTIMODAL_TOKENS, build_tokenizer
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


def tower_settings(hidden: int | None, layers: int | None) -> dict:
    """`SMALL_VISION` overrides for a vision tower `hidden` wide (16-dim heads) and `layers` deep."""
    out: dict = {}
    if hidden:
        out.update(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=hidden // 16,
                   num_key_value_heads=hidden // 16, head_dim=16)
    if layers:
        out["num_hidden_layers"] = layers
    return out


def grow(old: Path, tok, vision: dict | None = None):
    """A new toy (this tokenizer's vocabulary, `toy_config`'s vision tower) holding `old`'s text weights.

    The embedding rows of the image tokens (ids 102-108, appended after the text ids) start at the text rows'
    scale, never at zero: the sampler's uniform canvas noise draws them, and a zero row under the decoder's
    RMSNorm has a gradient 1/sqrt(eps) = 1000x too large, enough to swamp every other gradient in its clipping
    group. The vision embedder's projection starts so that soft tokens are as large as text embeddings."""
    from transformers import DiffusionGemmaForBlockDiffusion

    src = DiffusionGemmaForBlockDiffusion.from_pretrained(old, use_safetensors=True)
    text = src.config.text_config
    ids = image_token_ids(tok)
    first_new = min(tok.convert_tokens_to_ids(t) for t in MULTIMODAL_TOKENS.values())
    model = build_toy_model(len(tok), hidden=text.hidden_size, layers=text.num_hidden_layers,
                            sliding_window=text.sliding_window, image_ids=(ids.boi_id, ids.eoi_id, ids.image_id),
                            vision=vision)
    old_sd, new_sd = src.state_dict(), model.state_dict()
    with torch.no_grad():
        for name, value in new_sd.items():
            if ".vision_tower." in name or ".embed_vision." in name or name not in old_sd:
                continue
            if old_sd[name].shape == value.shape:
                value.copy_(old_sd[name])
            elif value.dim() == 2 and value.shape[1] == old_sd[name].shape[1]:  # embedding rows, new tokens appended
                value[: old_sd[name].shape[0]] = old_sd[name]
            else:
                raise ValueError(f"cannot grow {name}: {tuple(old_sd[name].shape)} -> {tuple(value.shape)}")
        emb = model.get_input_embeddings().weight
        emb[first_new:].normal_(0.0, emb[:first_new].std().item())
        enc = model.model.encoder
        table = enc.vision_tower.patch_embedder.position_embedding_table
        table.normal_(0.0, 0.02)  # transformers initialises it to ones: every position alike
        # embed_vision: RMSNorm (unit per dim) then this projection; text tokens enter as row * sqrt(hidden).
        text_norm = emb[:first_new].norm(dim=-1).mean().item() * text.hidden_size**0.5
        proj = enc.embed_vision.embedding_projection.weight  # [text hidden, vision hidden]
        proj.normal_(0.0, text_norm / (text.hidden_size * proj.shape[1]) ** 0.5)
    model.tie_weights()
    return model


def soft_token_targets(tok, text: str, centres, positions: torch.Tensor, size=IMAGE_SIZE) -> list[int]:
    """For each soft token of one image, the text token stage `vision` teaches it to look like: the digit whose
    centre falls in its cell of the resized image, else a space."""
    k = IMAGE_PROCESSOR["pooling_kernel_size"]
    cell = IMAGE_PROCESSOR["patch_size"] * k
    valid = positions[(positions >= 0).all(-1)]
    cols, rows = (int(valid[:, 0].max()) + 1) // k, (int(valid[:, 1].max()) + 1) // k
    sx, sy = cols * cell / size[0], rows * cell / size[1]
    ids = [tok.convert_tokens_to_ids(" ")] * (cols * rows)
    for c, (x, y) in zip(text, centres):
        col, row = min(cols - 1, int(x * sx // cell)), min(rows - 1, int(y * sy // cell))
        ids[row * cols + col] = tok.convert_tokens_to_ids(c)
    return ids


def vision_batch(tok, rng: random.Random, n: int, processor):
    """(pixel values, image positions, [n, soft tokens] target ids) for `n` fresh `read` images."""
    images, texts = [], []
    for _ in range(n):
        number = rng.randint(0, MAX_NUMBER)
        images.append(draw_number_placed(number, rng))
        texts.append(str(number))
    out = processor([img for img, _ in images], return_tensors="pt")
    pos = out["image_position_ids"]
    targets = [soft_token_targets(tok, t, c, pos[i]) for i, (t, (_, c)) in enumerate(zip(texts, images))]
    return out["pixel_values"], pos, torch.tensor(targets)


def train_vision(model, tok, args) -> None:
    """Stage `vision`: only the vision tower and its embedder train, on `read` images alone, with no pass through
    the text model: each soft token is pulled (MSE, relative to the target's size) towards the encoder's input
    embedding of the text token `soft_token_targets` names for it, so the text model receives an image as
    the digits it already reads in prompts, in place, on a row of spaces. The text weights are not touched."""
    processor = image_processor()
    rng = random.Random(args.seed + args.start_step)
    enc = model.model.encoder
    params = [p for n, p in model.named_parameters() if ".vision_tower." in n or ".embed_vision." in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    resumed = load_optimizer(opt, args.out) if args.resume and args.init_from == args.out else False
    emb = model.get_input_embeddings()
    table = (emb.weight * emb.embed_scale).detach()  # what a text token enters the encoder as
    space = tok.convert_tokens_to_ids(" ")
    classes = torch.tensor([space] + [tok.convert_tokens_to_ids(str(d)) for d in range(10)])
    warmup = 0 if resumed else 100
    start = time.time() - args.elapsed
    model.train()
    step, stats = args.start_step - 1, None
    for step in range(args.start_step, args.steps):
        if args.time_budget and time.time() - start > args.time_budget:
            step -= 1
            break
        p = min(1.0, step / max(1, args.steps))
        lr = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))) * min(1.0, (step - args.start_step + 1)
                                                                             / max(1, warmup))
        for g in opt.param_groups:
            g["lr"] = lr
        pixels, positions, targets = vision_batch(tok, rng, args.batch_size, processor)
        soft = enc.get_image_features(pixels, positions).pooler_output.reshape(-1, table.shape[1])  # [image tokens, hidden]
        flat = targets.reshape(-1)
        want = table[flat]
        err = (soft - want).pow(2).mean(-1) / want.pow(2).mean(-1)
        weight = torch.where(flat == space, 1.0, 10.0)  # a few digit cells among ~50 blank ones
        loss = (err * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            pred = classes[torch.cdist(soft, table[classes]).argmin(-1)].reshape(targets.shape)
            now = torch.tensor([loss.item(), (pred == targets).float().mean().item(),
                                (pred == targets).all(-1).float().mean().item()])
            stats = now if stats is None else 0.95 * stats + 0.05 * now
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {stats[0]:.4f} soft-token acc {stats[1]:.4f} image acc {stats[2]:.3f} "
                  f"lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
        if (step + 1) % args.save_every == 0:
            save(model, tok, args.out, {"step": step + 1, **vars(args), "out": str(args.out),
                                        "image_acc_ema": float(stats[2]), "elapsed": round(time.time() - start, 1)})
            save_optimizer(opt, args.out)
    print(f"done at step {step + 1} {time.time() - start:.0f}s", flush=True)
    save(model, tok, args.out, {"step": step + 1, **vars(args), "out": str(args.out),
                                "image_acc_ema": None if stats is None else float(stats[2]),
                                "elapsed": round(time.time() - start, 1)})
    save_optimizer(opt, args.out)


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
    ap.add_argument("--vision-hidden", type=int, help="with --grow-from: the new vision tower's width")
    ap.add_argument("--vision-layers", type=int, help="with --grow-from: the new vision tower's depth")
    ap.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps")
    ap.add_argument("--freeze-vision", action="store_true",
                    help="joint stage: the vision tower and embedder keep their weights (no gradients through them)")
    ap.add_argument("--freeze-text", action="store_true",
                    help="joint stage: the text model keeps its weights; only the vision tower and embedder learn, "
                    "from the gradients the text model hands back")
    ap.add_argument("--stage", choices=("joint", "vision"), default="joint",
                    help="vision: train only the vision tower and embedder on `read` images (`train_vision`)")
    args = ap.parse_args()
    if args.freeze_text and args.freeze_vision:
        ap.error("--freeze-text and --freeze-vision: nothing would train")

    elapsed = 0.0
    if args.resume and (args.out / "training.json").is_file():
        meta = json.loads((args.out / "training.json").read_text())
        args.init_from, args.grow_from, args.start_step = args.out, None, int(meta["step"])
        elapsed = float(meta.get("elapsed", 0.0))
    args.elapsed = elapsed
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
    if args.stage == "vision":
        from transformers import DiffusionGemmaForBlockDiffusion

        model = (DiffusionGemmaForBlockDiffusion.from_pretrained(args.init_from, use_safetensors=True)
                 if args.init_from else grow(args.grow_from, tok, tower_settings(args.vision_hidden, args.vision_layers)))
        return train_vision(model, tok, args)
    stream = BatchStream(args.seed + args.start_step, args.batch_size, args.eos_canvas_p, dict(TASK_WEIGHTS))
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=args.workers, pin_memory=args.device.startswith("cuda"),
        prefetch_factor=8 if args.workers else None,
    )
    if args.init_from:
        from transformers import DiffusionGemmaForBlockDiffusion

        model = DiffusionGemmaForBlockDiffusion.from_pretrained(args.init_from, use_safetensors=True)
    elif args.grow_from:
        model = grow(args.grow_from, tok, tower_settings(args.vision_hidden, args.vision_layers))
    else:
        model = build_toy_model(vocab, hidden=args.hidden, layers=args.layers)
    batches = iter(loader)  # workers fork before CUDA initialises
    model.to(args.device).train()
    vision = [p for n, p in model.named_parameters() if ".vision_tower." in n or ".embed_vision." in n]
    text = [p for n, p in model.named_parameters() if not (".vision_tower." in n or ".embed_vision." in n)]
    groups = [{"params": text, "mult": 1.0}, {"params": vision, "mult": args.vision_lr_mult}]
    if args.freeze_vision:
        for p in vision:
            p.requires_grad_(False)
        groups = groups[:1]
    if args.freeze_text:  # the text model as shipped: only the tower learns, through it (its prompt, in effect)
        for p in text:
            p.requires_grad_(False)
        groups = groups[1:]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    resumed = load_optimizer(opt, args.out) if args.resume and args.init_from == args.out else False
    warmup = args.warmup
    start, ema, read_ema = time.time() - elapsed, None, None

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
        if pixels is not None:  # `read` rows: the share whose noisy canvas is denoised whole in one pass
            with torch.no_grad():
                rows = (ids == model.config.image_token_id).any(-1)
                hit = (logits[rows].argmax(-1) == clean[rows]).all(-1).float().mean()
                read_ema = hit if read_ema is None else 0.95 * read_ema + 0.05 * hit
        if step % 50 == 0 or step == args.steps - 1:
            seen = "" if read_ema is None else f" read canvas exact {read_ema.item():.3f}"
            print(f"step {step} loss {ema.item():.4f}{seen} lr {lr_at(step):.2e} {time.time() - start:.0f}s",
                  flush=True)
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

