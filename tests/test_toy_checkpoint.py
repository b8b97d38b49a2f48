"""The shipped toy checkpoint is a real DiffusionGemma and is good at its task family."""

import json

from dgbatch.toy.evaluate import evaluate, load
from dgbatch.toy.tasks import answer_for, sample_examples


def test_loads_through_standard_transformers_apis(toy_model_dir):
    tok, model = load(str(toy_model_dir))
    cfg = model.config
    assert type(model).__name__ == "DiffusionGemmaForBlockDiffusion"
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert cfg.canvas_length == 16 and cfg.text_config.num_experts >= 4 and cfg.text_config.top_k_experts == 2
    assert {"sliding_attention", "full_attention"} <= set(cfg.text_config.layer_types)
    assert cfg.text_config.sliding_window < 150  # shorter than the longest count context it serves
    assert cfg.vision_config is not None
    assert (tok.image_token_id, cfg.image_token_id) == (104, 104) and len(tok) == cfg.text_config.vocab_size
    assert (toy_model_dir / "processor_config.json").is_file()
    files = {p.name for p in toy_model_dir.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert sum(p.stat().st_size for p in toy_model_dir.iterdir()) <= 10 * 2**20
    ids = tok.apply_chat_template([{"role": "user", "content": "count 1-3"}], add_generation_prompt=True)
    assert tok.decode(ids["input_ids"] if isinstance(ids, dict) else ids).startswith("<bos><start_of_turn>user\n")
    gen = json.loads((toy_model_dir / "generation_config.json").read_text())
    assert gen["max_denoising_steps"] > 0 and gen["t_max"] > gen["t_min"]


def test_task_family_grader():
    for ex in sample_examples(60, seed=3):
        assert answer_for(ex.prompt) == ex.answer
    assert answer_for("count 3-5") == "3 4 5" and answer_for("hello") is None


def test_accuracy_bar_on_a_fixed_sample(toy_model_dir):
    """>= 90% exact overall, >= 80% on each task, tokens/forward well above 1 (defaults of the checkpoint)."""
    r = evaluate(str(toy_model_dir), n=210, seed=1234)
    assert r["accuracy"] >= 0.90, r
    assert all(acc >= 0.80 for acc in r["per_task"].values()), r
    assert r["mean_tokens_per_forward"] >= 2.0, r

