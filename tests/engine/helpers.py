"""Helpers for the engine tests: tiny random models, the trained toy checkpoint, and transformers'
own encoder/decoder passes as the oracle."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from dgbatch.toy.model import build_toy_model

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "toy-diffusiongemma"


def random_model(vocab: int = 97, *, layers: int = 4, sliding_window: int = 12, seed: int = 0):
    """A random toy DiffusionGemma in fp32 eval mode; a small window so contexts exceed it."""
    torch.manual_seed(seed)
    return build_toy_model(vocab, hidden=64, layers=layers, sliding_window=sliding_window).eval()


def random_vision_model(vocab: int = 97, *, layers: int = 4, sliding_window: int = 12, seed: int = 0):
    """`random_model` whose last three ids are its boi / eoi / image tokens (the toy's vision tower)."""
    torch.manual_seed(seed)
    ids = (vocab - 3, vocab - 2, vocab - 1)
    return build_toy_model(vocab, hidden=64, layers=layers, sliding_window=sliding_window, image_ids=ids).eval()


def random_images(sizes: list[tuple[int, int]], seed: int = 0):
    """`VisionInputs` for noisy RGB images of (width, height) sizes, through the toy's image processor."""
    import numpy as np
    from PIL import Image

    from dgbatch.generation import VisionInputs
    from dgbatch.toy.train import image_processor

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    out = image_processor()(images, return_tensors="pt")
    return VisionInputs(out["pixel_values"], out["image_position_ids"], tuple(int(n) for n in out["num_soft_tokens_per_image"]))


def split_images(v, counts: list[int]) -> list:
    """One `VisionInputs` per row from a batch's: row i takes the next counts[i] images (None for 0)."""
    from dgbatch.generation import VisionInputs

    out, k = [], 0
    for n in counts:
        out.append(None if n == 0 else VisionInputs(v.pixel_values[k : k + n], v.position_ids[k : k + n],
                                                     v.soft_tokens[k : k + n]))
        k += n
    return out


def engine_logits(model, prompts, canvases, canvas, sc_logits, slots=None, max_len=None, mode="separate",
                  vision=None):
    """Encode `prompts` (with their `vision` inputs, one per prompt or None) into `slots`, commit `canvases`,
    decode `canvas` with self-conditioning, with the engine's runner.

    mode: "separate" (encoder passes, then a decoder pass), "fused" (the last encoder pass and the
    decoder pass are one model pass, as the engine runs them), "unfused" (same call, but the runner
    is told the two sides differ, so it runs them one after the other)."""
    from dgbatch.engine.packing import pack
    from dgbatch.engine.runner import ModelRunner

    runner = ModelRunner(model)
    if mode == "unfused":
        runner.fused = False
    n = len(prompts)
    slots = list(range(n)) if slots is None else slots
    cache = runner.new_cache(num_slots=max(slots) + 1, capacity=max(map(len, prompts)) + 16 * len(canvases))
    passes = [list(prompts)] + [c.tolist() for c in canvases]
    lengths = [0] * n
    last = None
    for k, tokens in enumerate(passes):
        batch = pack(cache, slots, tokens, lengths, lambda _: max_len, vision=vision if k == 0 else None,
                     image_id=runner.image_token_id)
        lengths = [length + len(t) for length, t in zip(lengths, tokens)]
        if mode != "separate" and k == len(passes) - 1:
            last = batch
        else:
            runner.encode(cache, batch)
    # decode runs on slots [0, S): place the rows' canvases there
    full = torch.zeros((cache.num_slots, canvas.shape[1]), dtype=torch.long)
    full[slots] = canvas
    soft = torch.zeros((cache.num_slots, canvas.shape[1], runner.hidden_size))
    if sc_logits is not None:
        soft[slots] = runner.soft_embedding(sc_logits.softmax(-1, dtype=torch.float32))
    return runner.forward(cache, cache.num_slots, full, soft, last, max_len)[slots]


def varied_stop_params(**overrides):
    """Sampling settings under which a random model's rows end at different times.

    Random weights never converge on their own; a confidence threshold near the model's typical mean
    entropy (~4.0) with no stability requirement makes rows stop after different numbers of steps,
    and EOS (id 1) is drawn often enough that rows end after different numbers of canvases."""
    from dgbatch.generation import SamplingParams

    base = {
        "max_new_tokens": 64,
        "max_denoising_steps": 6,
        "entropy_bound": 0.5,
        "t_min": 0.3,
        "t_max": 0.6,
        "stability_threshold": 0,
        "confidence_threshold": 4.03,
        "seed": 11,
    }
    return SamplingParams(**{**base, **overrides})


def random_requests(n: int, vocab: int, prefix: str = "r") -> list:
    """n seeded prompts of 2-59 random tokens (ids >= 3: no pad/eos/bos), many longer than a small window."""
    from dgbatch.generation import Request

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 60, (n,), generator=g).tolist()
    return [Request(f"{prefix}{i}", torch.randint(3, vocab, (k,), generator=g).tolist()) for i, k in enumerate(lengths)]


def toy_requests(tok, n: int, seed: int, prefix: str) -> tuple[list, list]:
    """(examples, chat-templated requests) for n seeded prompts of the toy task family."""
    from dgbatch.generation import Request
    from dgbatch.toy.tasks import sample_examples

    examples = sample_examples(n, seed=seed)
    reqs = [
        Request(
            f"{prefix}{i}",
            tok.apply_chat_template([{"role": "user", "content": e.prompt}], add_generation_prompt=True)["input_ids"],
        )
        for i, e in enumerate(examples)
    ]
    return examples, reqs


def trained_checkpoint():
    """The trained toy checkpoint (model, tokenizer), or skip if it has not been saved yet."""
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    if not (CHECKPOINT / "model.safetensors").is_file():
        pytest.fail(f"no trained toy checkpoint at {CHECKPOINT}; it is committed to the repo")
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(CHECKPOINT)).eval()
    return model, AutoTokenizer.from_pretrained(str(CHECKPOINT))


class TransformersOracle:
    """Drives transformers' encoder and decoder exactly as `generate` does (DynamicCache, shared
    positions, left padding through the 2D masks; a prompt's images as `generate`'s prefill takes them),
    so the engine's passes can be compared to it."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int = 0, vision: list | None = None):
        from transformers import DynamicCache

        self.model = model
        width = max(len(p) for p in prompts)
        self.ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for i, p in enumerate(prompts):
            self.ids[i, width - len(p) :] = torch.tensor(p)
            self.mask[i, width - len(p) :] = True
        self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        self.cur_len = 0
        images = {}
        rows = [v for v in vision or [] if v is not None]
        if rows:  # what the processor hands `generate`: pixels in row order, mm_token_type_ids
            images = {"pixel_values": torch.cat([v.pixel_values for v in rows]),
                      "image_position_ids": torch.cat([v.position_ids for v in rows]),
                      "mm_token_type_ids": (self.ids == model.config.image_token_id).long()}
        self._encode(self.ids, **images)

    def _encode(self, ids: torch.Tensor, **images) -> None:
        enc = self.model.model.encoder
        pos = torch.arange(self.cur_len, self.cur_len + ids.shape[1], dtype=torch.int32).unsqueeze(0)
        dummy = torch.empty((ids.shape[0], ids.shape[1], 0), dtype=self.model.dtype)
        masks = enc.create_masks_for_generate(
            config=self.model.config,
            inputs_embeds=dummy,
            attention_mask=self.mask,
            past_key_values=self.cache,
            position_ids=pos,
            mm_token_type_ids=images.get("mm_token_type_ids"),
        )
        enc(input_ids=ids, attention_mask=masks, past_key_values=self.cache, position_ids=pos, **images)
        self.cur_len += ids.shape[1]

    def commit(self, canvas: torch.Tensor) -> None:
        """Append a canvas [B, C] to every row, as generate does between canvases."""
        self.mask = torch.nn.functional.pad(self.mask, (0, canvas.shape[1]), value=True)
        self._encode(canvas)

    def decode(self, canvas: torch.Tensor, sc_logits: torch.Tensor | None) -> torch.Tensor:
        c = canvas.shape[1]
        dec_mask = torch.nn.functional.pad(self.mask, (0, c), value=True)
        masks = self.model.model.decoder.create_diffusion_decoder_attention_mask(
            config=self.model.config,
            inputs_embeds=canvas.unsqueeze(-1),
            past_key_values=self.cache,
            decoder_attention_mask=dec_mask,
        )
        pos = torch.arange(self.cur_len, self.cur_len + c, dtype=torch.int32).unsqueeze(0)
        out = self.model(
            decoder_input_ids=canvas,
            self_conditioning_logits=sc_logits,
            decoder_attention_mask=masks,
            past_key_values=self.cache,
            decoder_position_ids=pos,
        )
        return out.logits


@contextmanager
def generate_with_engine_draws(model, reference):
    """Make transformers' `generate` (behind `reference`, a ReferenceBackend) draw the same random
    numbers as the engine: each row's initial canvas, denoiser sample and renoising tokens come from
    the engine's per-row hash at (row, canvas, step) instead of the global generator.

    Everything else is transformers' own loop, so row-for-row equal outputs show that the engine
    runs the same algorithm, not only one with the same statistics. Test-only patching."""
    from transformers.models.diffusion_gemma import generation_diffusion_gemma as gen

    from dgbatch.engine import rng

    params = reference.params
    c, v = model.config.canvas_length, model.config.text_config.vocab_size
    state = {"keys": None, "canvas": -1, "step": 0}

    def draw_ids(n):
        k = torch.full((n,), state["canvas"], dtype=torch.long)
        return state["keys"], k, torch.full((n,), state["step"], dtype=torch.long)

    def initialize_canvas(self, batch_size, device):
        state["canvas"] += 1
        state["step"] = 0
        return rng.random_tokens(*draw_ids(batch_size), rng.STREAM_INIT, c, v).to(device)

    def renoise_canvas(self, accepted_canvas, cur_step):
        noise = rng.random_tokens(*draw_ids(accepted_canvas.shape[0]), rng.STREAM_RENOISE, c, v)
        return torch.where(self.accepted_token_mask, accepted_canvas, noise.to(accepted_canvas.device))

    def multinomial(probs, num_samples=1, **kw):
        u = rng.uniform(*draw_ids(probs.shape[0] // c), rng.STREAM_SAMPLE, c).reshape(-1, 1)
        cdf = probs.cumsum(-1)
        return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)

    denoising_step = model._denoising_step

    def step(*args, cur_step, **kwargs):
        state["step"] = params.max_denoising_steps - cur_step
        return denoising_step(*args, cur_step=cur_step, **kwargs)

    generate_batch = reference._generate_batch

    def batch(rows, *args):
        state["keys"] = torch.tensor([rng.row_key(params.seed, r.row_id) for r in rows])
        state["canvas"] = -1
        return generate_batch(rows, *args)

    saved = (gen.EntropyBoundSampler.initialize_canvas, gen.EntropyBoundSampler.renoise_canvas, torch.multinomial)
    gen.EntropyBoundSampler.initialize_canvas, gen.EntropyBoundSampler.renoise_canvas = (
        initialize_canvas,
        renoise_canvas,
    )
    torch.multinomial = multinomial
    model._denoising_step, reference._generate_batch = step, batch
    try:
        yield
    finally:
        gen.EntropyBoundSampler.initialize_canvas, gen.EntropyBoundSampler.renoise_canvas, torch.multinomial = saved
        del model._denoising_step, reference._generate_batch
