"""A tiny random-weight BERT for tests: same tokenizer as MiniLM, seconds to export, deterministic."""

from __future__ import annotations

import shutil
from pathlib import Path

from .offline import ensure_offline

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def make_tiny_bert(out_dir: str | Path, seed: int = 0, base_model: str | Path | None = None) -> Path:
    """Writes a seeded BertModel (hidden 32, 2 layers, 2 heads, intermediate 64, MiniLM vocabulary) plus the
    MiniLM tokenizer files into ``out_dir``; returns ``out_dir``."""
    ensure_offline()
    import torch
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertModel

    from bundlerec_export.onnx_export import default_base_model

    base = Path(base_model) if base_model else default_base_model()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = Tokenizer.from_file(str(base / "tokenizer.json")).get_vocab_size()
    config = BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, type_vocab_size=2,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    return out
