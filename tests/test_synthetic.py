"""The synthetic checkpoints are what transformers expects: it loads every layout and dtype without complaint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quantize.checkpoint import open_checkpoint
from quantize.synthetic import PRESETS, make_checkpoint, padded_vocab

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VARIANTS = [
    pytest.param({"layout": "hub"}, id="hub-4.x"),
    pytest.param({"layout": "saved5"}, id="saved-5.x"),
    pytest.param({"layout": "state_dict"}, id="state-dict"),
    pytest.param({"layout": "hub", "dtype": "bf16", "shards": 3}, id="bf16-sharded"),
    pytest.param({"layout": "hub", "dtype": "f16", "num_key_value_heads": 2}, id="f16-gqa"),
]


@pytest.mark.parametrize("options", VARIANTS)
def test_transformers_loads_every_layout(options: dict, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "ckpt", **options)
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # The values transformers loaded are the ones our reader sees, whatever the layout and dtype.
    ours = open_checkpoint(path)
    state = model.state_dict()
    for canon, theirs in [
        ("model.layers.1.self_attn.k_proj.weight", "model.language_model.layers.1.self_attn.k_proj.weight"),
        ("vision.encoder.layers.0.mlp.fc1.weight", "model.vision_tower.encoder.layers.0.mlp.fc1.weight"),
        ("projector.linear_2.bias", "model.multi_modal_projector.linear_2.bias"),
        ("lm_head.weight", "lm_head.weight"),
    ]:
        np.testing.assert_array_equal(ours.read(canon), state[theirs].numpy())
    cfg = model.config
    # transformers' config, the embedding it loaded, and llava-hf's padding rule (384 pieces + <image> + <pad>,
    # rounded up to a multiple of 64) all agree.
    assert cfg.text_config.vocab_size == padded_vocab(PRESETS["tiny"]) == 448
    assert state["lm_head.weight"].shape[0] == cfg.text_config.vocab_size
    assert cfg.text_config.num_key_value_heads == options.get("num_key_value_heads", 4)


def test_processor_loads_and_expands_image_tokens(tiny_checkpoint: Path) -> None:
    from PIL import Image

    processor = transformers.AutoProcessor.from_pretrained(tiny_checkpoint)
    image = Image.new("RGB", (336, 336), (120, 30, 200))
    batch = processor(images=image, text="USER: <image>\nWhat is this? ASSISTANT:", return_tensors="pt")
    image_id = json.loads((tiny_checkpoint / "config.json").read_text())["image_token_index"]
    assert int((batch["input_ids"] == image_id).sum()) == 576
    assert tuple(batch["pixel_values"].shape) == (1, 3, 336, 336)


def test_tokenizer_files_agree_with_sentencepiece(tiny_checkpoint: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))
    tok = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    for text in ["What is this image? A cat on the mat 123.", "Describe the picture, please!"]:
        assert tok(text).input_ids == [sp.bos_id(), *sp.encode(text)]
    assert tok.convert_tokens_to_ids("<image>") == PRESETS["tiny"].vocab_pieces


def test_same_arguments_same_bytes(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a", dtype="bf16", shards=2, seed=3)
    b = make_checkpoint(tmp_path / "b", dtype="bf16", shards=2, seed=3)
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_tiny256_rows_are_multiples_of_256(tiny256_checkpoint: Path) -> None:
    ckpt = open_checkpoint(tiny256_checkpoint)
    for name, ref in ckpt.tensors.items():
        if len(ref.shape) == 2 and "position_embedding" not in name:
            assert ref.shape[1] % 256 == 0, name
