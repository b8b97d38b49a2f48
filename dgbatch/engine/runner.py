"""The model pass the engine needs, on transformers' modules and the slot cache.

One pass can do two things:
- encode: the encoder (causal, windowed on sliding layers) over new tokens of some rows, after each
          row's committed prefix, packed without padding (`packing.EncoderBatch`); stores their K/V.
          New prompts (empty prefix) and finished canvases (C tokens) go through the same pass. A prompt's
          images go through the vision tower in its pass: their soft tokens replace the image tokens'
          embeddings, and (use_bidirectional_attention="vision") an image's tokens see each other.
- decode: the decoder over the current canvases of slots [0, n) (bidirectional over the prefix and
          the canvas); returns softcapped fp32 logits. Its shapes depend only on n (and on `max_len`
          when the caller bounds the prefix read).

DiffusionGemma's encoder and decoder share every layer weight (transformers ties them), so when a
pass does both, encoder and decoder tokens go through each layer's norms, projections, MLP and
experts together; only attention is per side. Layer by layer, the encoder tokens' K/V are stored
before the decoder's attention reads the prefix, so a row whose canvas is being committed already
denoises its next canvas in the same pass. The engine then makes one model pass per loop iteration,
not one encoder and one decoder pass. A checkpoint whose two sides differ runs them one after the
other. The encoder tokens skip the last layer's attention and feed-forward: only its K/V are read.
"""

from __future__ import annotations

import torch

from dgbatch.engine.attention import feed_forward, project_qkv, sdpa
from dgbatch.engine.cache import SlotKVCache, layer_specs
from dgbatch.engine.packing import EncoderBatch


def shares_weights(enc, dec) -> bool:
    """True when the encoder's layers compute exactly what the decoder's do (the same weight storage,
    equal buffers and RoPE tables), so one pass may run both sides' tokens through the decoder's modules."""

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()

    for a, b in ((enc.layers, dec.layers), (enc.rotary_emb, dec.rotary_emb)):
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        if pa.keys() != pb.keys() or not all(same(pa[k], pb[k]) for k in pa):
            return False
        ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
        if ba.keys() != bb.keys() or not all(torch.equal(ba[k], bb[k]) for k in ba):
            return False
    return same(enc.embed_tokens.weight, dec.embed_tokens.weight) and torch.equal(
        enc.embed_tokens.embed_scale, dec.embed_tokens.embed_scale)


class ModelRunner:
    def __init__(self, model):
        text = model.config.get_text_config()
        if getattr(text, "use_bidirectional_attention", None) == "all":
            raise NotImplementedError("use_bidirectional_attention='all' (a bidirectional encoder) is not supported")
        enc = model.model.encoder.language_model
        dec = model.model.decoder
        self.model = model
        self.enc_embed, self.enc_layers, self.enc_rope = enc.embed_tokens, enc.layers, enc.rotary_emb
        self.dec_embed, self.dec_layers, self.dec_rope = dec.embed_tokens, dec.layers, dec.rotary_emb
        self.self_conditioning, self.dec_norm = dec.self_conditioning, dec.norm
        self.lm_head = model.lm_head
        self.softcap = model.final_logit_softcapping
        self.layer_types = list(text.layer_types)
        self.sliding_window = text.sliding_window
        self.canvas = model.config.canvas_length
        self.vocab_size = text.vocab_size
        self.hidden_size = text.hidden_size
        self.specs = layer_specs(model)
        self.fused = shares_weights(enc, dec)
        self.image_token_id = getattr(model.config, "image_token_id", None)
        # Larger Gemma 4 models let an image's tokens attend to each other both ways; smaller ones are causal.
        self.image_blocks_bidirectional = getattr(text, "use_bidirectional_attention", None) == "vision"

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.dec_embed.weight.dtype

    def new_cache(self, num_slots: int, capacity: int) -> SlotKVCache:
        return SlotKVCache(self.specs, num_slots, capacity, self.sliding_window, self.canvas, self.dtype, self.device)

    def _rope(self, rope, h: torch.Tensor, positions: torch.Tensor) -> dict:
        return {t: rope(h, positions, t) for t in set(self.layer_types)}

    def encode(self, cache: SlotKVCache, batch: EncoderBatch) -> None:
        """Encode `batch`'s new tokens after each row's committed prefix and store their K/V."""
        self.forward(cache, 0, None, None, batch)

    def decode(
        self, cache: SlotKVCache, n: int, canvas: torch.Tensor, soft: torch.Tensor, max_len: int | None = None
    ) -> torch.Tensor:
        """Decoder pass over slots [0, n): canvas [n, C], soft embeddings [n, C, hidden] -> logits [n, C, V] fp32."""
        return self.forward(cache, n, canvas, soft, None, max_len)

    def image_features(self, images) -> torch.Tensor:
        """The vision tower and its projection, as transformers' encoder runs them: an `ImageBatch`'s
        pixels -> [soft tokens, hidden], in the order of the images' soft tokens."""
        enc = self.model.model.encoder
        out = enc.get_image_features(images.pixel_values.to(self.dtype), images.position_ids, return_dict=True)
        return out.pooler_output

    def _encoder_embeds(self, batch: EncoderBatch) -> torch.Tensor:
        """[T, hidden]: the new tokens' embeddings, the images' soft tokens in place of their image tokens."""
        e = self.enc_embed(batch.ids)
        if batch.images is not None:
            e = e.index_copy(0, batch.images.token_index, self.image_features(batch.images).to(e.dtype))
        return e

    def _encoder_masks(self, cache: SlotKVCache, g) -> dict[bool, torch.Tensor]:
        """{sliding: [G, 1, width, prefix + width]}: causal (windowed) masks, and an image's tokens see each other."""
        masks = {s: cache.encoder_mask(g.lengths, g.width, s, g.max_len) for s in (False, True)}
        both_ways = g.image_mask() if self.image_blocks_bidirectional else None
        if both_ways is not None:
            for m in masks.values():
                m[..., -g.width :] |= both_ways
        return masks

    def soft_embedding(self, probs: torch.Tensor) -> torch.Tensor:
        """Self-conditioning input from a softmax [N, C, V] (fp32): probs @ E * embed_scale -> [N, C, hidden]."""
        w = self.dec_embed.weight
        return torch.matmul(probs.to(w.dtype), w) * self.dec_embed.embed_scale.to(w.dtype)

    def forward(
        self,
        cache: SlotKVCache,
        n: int,
        canvas: torch.Tensor | None,
        soft: torch.Tensor | None,
        batch: EncoderBatch | None = None,
        max_len: int | None = None,
    ) -> torch.Tensor | None:
        """Encode `batch` (if given), then decode slots [0, n) (if n > 0) reading the prefix with it.

        canvas [n, C] and soft embeddings [n, C, hidden] (zeros at a canvas's first step, which is
        what transformers' decoder computes for `self_conditioning_logits=None`); max_len: an upper
        bound on the decoded rows' committed lengths (full-attention layers then read a shorter
        view), default all: one static shape. Returns logits [n, C, V] fp32, or None when n == 0.
        """
        if batch is not None and n and not self.fused:
            self._pass(cache, 0, None, None, batch, None)
            batch = None
        return self._pass(cache, n, canvas, soft, batch, max_len)

    def _pass(self, cache, n, canvas, soft, batch, max_len):
        c, nd = self.canvas, n * self.canvas  # decoder tokens come first in the pass, then encoder tokens
        layers, rope = (self.dec_layers, self.dec_rope) if n else (self.enc_layers, self.enc_rope)
        embeds, positions = [], []
        if batch is not None:
            cache.commit_lengths(batch)  # what the decoder reads; encoder groups carry the lengths before
            enc_masks = [self._encoder_masks(cache, g) for g in batch.groups]  # [G, 1, width, prefix + width]
        if n:
            lengths = cache.lengths[:n]
            positions.append((lengths[:, None] + torch.arange(c, device=lengths.device)[None, :]).reshape(nd))
            embeds.append(self.self_conditioning(self.dec_embed(canvas), soft).reshape(nd, -1))
            dec_masks = {s: cache.decoder_mask(lengths, s, max_len) for s in (False, True)}  # [n, 1, 1, C + prefix]
        if batch is not None:
            positions.append(batch.positions)
            embeds.append(self._encoder_embeds(batch))
        h = torch.cat(embeds)[None] if len(embeds) > 1 else embeds[0][None]  # [1, nd + T, hidden]
        pos = torch.cat(positions)[None] if len(positions) > 1 else positions[0][None]
        cos_sin = self._rope(rope, h, pos)
        last = len(layers) - 1
        for i, layer in enumerate(layers):
            attn, sliding = layer.self_attn, self.specs[i].sliding
            q, k, v = (t[0] for t in project_qkv(attn, layer.input_layernorm(h), *cos_sin[self.layer_types[i]]))
            outs = []  # [tokens, Hq * D] per side, in pass order
            if n:
                qd, kd, vd = (t[:nd].view(n, c, -1, t.shape[-1]).transpose(1, 2) for t in (q, k, v))
                cache.write_canvas(i, n, kd, vd)
            if batch is not None:
                qe, ke, ve = q[nd:], k[nd:], v[nd:]
                if i < last:
                    for g, m in zip(batch.groups, enc_masks):
                        keys, values = cache.encoder_kv(  # the prefix as it was before this pass
                            i, g.rows, g.to_padded(ke[g.start : g.end]), g.to_padded(ve[g.start : g.end]), g.max_len)
                        outs.append(g.to_packed(sdpa(attn, g.to_padded(qe[g.start : g.end]), keys, values, m[sliding])))
                cache.append(i, ke, ve, batch)
            if n:
                keys, values = cache.decoder_kv(i, n, max_len)  # views: no copy; includes this pass's commits
                outs.insert(0, sdpa(attn, qd, keys, values, dec_masks[sliding]).transpose(1, 2).reshape(nd, -1))
            if i == last and batch is not None:  # nothing reads the encoder tokens' last-layer output
                if not n:
                    return None
                h = h[:, :nd]
            a = attn.o_proj(torch.cat(outs)[None] if len(outs) > 1 else outs[0][None])
            h = h + layer.post_attention_layernorm(a)
            h = feed_forward(layer, h) * layer.layer_scalar
        logits = self.lm_head(self.dec_norm(h[0])).view(n, c, -1).float()  # [n, C, V]; no-op cast for fp32
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits
