"""A character-level tokenizer shaped like the real checkpoint's: pad=0, eos=1, bos=2, a chat template,
and Gemma 4's image tokens (boi / eoi / image placeholder, plus the video and audio names its processor
looks up), appended after the characters so every text id is what it was before images came."""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII, space and newline
# Attribute names Gemma4Processor reads from its tokenizer -> token. Order fixes the ids (102..108).
MULTIMODAL_TOKENS = {
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "image_token": "<|image|>",
    "video_token": "<|video|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "audio_token": "<|audio|>",
}

# Gemma's turn format, with the role names kept short. A message's content is a string or a list of
# parts; an image part becomes one image placeholder, which the processor expands to boi + soft tokens + eoi.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|image|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    mm = list(MULTIMODAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS + mm)}
    # A BPE model with no merges is a character-level model; no pre-tokenizer keeps spaces as tokens.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(SPECIAL_TOKENS + mm)
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens=dict(MULTIMODAL_TOKENS),
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
