"""The text half of a LLaVA checkpoint as a llama.cpp ``llama`` GGUF: hyper-parameters, tensors, vocabulary.

LLaVA-1.5's language model is LLaMA-2 (Vicuna), BakLLaVA's is Mistral-7B (grouped-query attention); both are
llama.cpp's ``llama`` architecture. Names come from gguf's own tensor-name map, keys from ``gguf.Keys`` via the
writer's typed helpers, so nothing here hand-types a GGUF name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from llava_cli.errors import CheckpointError
from quantize.checkpoint import Checkpoint, TensorPlan

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]

# Scores llama.cpp's own converter gives to tokens that are not SentencePiece pieces
# (convert_hf_to_gguf.py _create_vocab_sentencepiece).
_PAD_SCORE = -10000.0
_ADDED_SCORE = -1000.0


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K rows from HF's rotate-half RoPE layout to llama.cpp's adjacent-pair ("normal") RoPE.

    Within each head, rows [0..d/2) and [d/2..d) are interleaved: 0, d/2, 1, d/2+1, ... Without this the
    logits are garbage (cosine 0.68 against HF; tests/test_parity.py checks the permuted result). K uses the
    KV head count."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos: int
    eos: int
    unk: int
    pad: int | None
    add_bos: bool
    add_eos: bool


def load_vocab(path: Path, n_rows: int) -> Vocab:
    """The SentencePiece vocabulary of a llava-hf checkpoint padded to the embedding's `n_rows` rows.

    Ids 0..n-1 come from tokenizer.model with their scores and piece types, the added tokens (``<image>``,
    ``<pad>``) from added_tokens.json / tokenizer_config.json, and the rest are unique ``[PAD{i}]`` entries
    (llama.cpp requires exactly one token per embedding row, and unique strings)."""
    model_file = path / "tokenizer.model"
    if not model_file.is_file():
        raise CheckpointError(
            f"{path}: no tokenizer.model (the SentencePiece vocabulary)",
            hint="download tokenizer.model from the same repository as the weights",
        )
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(model_file))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{model_file}: not a SentencePiece model ({exc})", hint="fetch it again") from exc
    n_sp = sp.get_piece_size()
    if n_sp > n_rows:
        raise CheckpointError(f"{model_file}: {n_sp} pieces but the embedding has only {n_rows} rows")

    tokens = [f"[PAD{i}]" for i in range(n_rows)]
    scores = [_PAD_SCORE] * n_rows
    types = [int(gguf.TokenType.UNUSED)] * n_rows
    for i in range(n_sp):
        tokens[i] = sp.id_to_piece(i)
        scores[i] = float(sp.get_score(i))
        if sp.is_unknown(i):
            types[i] = int(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types[i] = int(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types[i] = int(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types[i] = int(gguf.TokenType.BYTE)
        else:
            types[i] = int(gguf.TokenType.NORMAL)

    added: dict[int, tuple[str, bool]] = {}
    added_file = path / "added_tokens.json"
    if added_file.is_file():
        for text, idx in _json(added_file).items():
            added[int(idx)] = (str(text), False)
    tok_cfg_file = path / "tokenizer_config.json"
    tok_cfg: dict[str, Any] = _json(tok_cfg_file) if tok_cfg_file.is_file() else {}
    for idx, entry in (tok_cfg.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and "content" in entry:
            added[int(idx)] = (str(entry["content"]), bool(entry.get("special", False)))
    for idx, (text, special) in sorted(added.items()):
        if idx < n_sp:
            continue  # <unk>, <s>, </s> are already SentencePiece control pieces
        if idx >= n_rows:
            raise CheckpointError(
                f"{path}: added token {text!r} has id {idx}, beyond the {n_rows} embedding rows",
                hint="the tokenizer files do not belong to these weights",
            )
        tokens[idx] = text
        scores[idx] = _ADDED_SCORE
        types[idx] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)

    seen: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in seen:
            # llama.cpp aborts the whole process on duplicate token strings (llama-vocab.cpp GGML_ASSERT).
            raise CheckpointError(f"{path}: token {tok!r} appears twice (ids {seen[tok]} and {i})")
        seen[tok] = i

    pad_text = tok_cfg.get("pad_token")
    if isinstance(pad_text, dict):
        pad_text = pad_text.get("content")
    pad = seen.get(pad_text) if isinstance(pad_text, str) else None
    return Vocab(
        tokens=tokens,
        scores=scores,
        types=types,
        bos=int(sp.bos_id()),
        eos=int(sp.eos_id()),
        unk=int(sp.unk_id()),
        pad=pad,
        add_bos=bool(tok_cfg.get("add_bos_token", True)),
        add_eos=bool(tok_cfg.get("add_eos_token", False)),
    )


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})", hint="fetch the file again") from exc


def add_text_metadata(writer: gguf.GGUFWriter, ckpt: Checkpoint, vocab: Vocab, *, name: str, ftype: int) -> None:
    """Hyper-parameters and tokenizer keys, each through the writer's typed helper (llama.cpp asserts types)."""
    t = ckpt.config.text
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(t.max_position_embeddings)
    writer.add_embedding_length(t.hidden_size)
    writer.add_block_count(t.num_hidden_layers)
    writer.add_feed_forward_length(t.intermediate_size)
    writer.add_head_count(t.num_attention_heads)
    writer.add_head_count_kv(t.num_key_value_heads)
    writer.add_layer_norm_rms_eps(t.rms_norm_eps)
    writer.add_rope_freq_base(t.rope_theta)
    writer.add_rope_dimension_count(t.head_dim)
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(vocab.bos)
    writer.add_eos_token_id(vocab.eos)
    writer.add_unk_token_id(vocab.unk)
    if vocab.pad is not None:
        writer.add_pad_token_id(vocab.pad)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)


def text_tensors(ckpt: Checkpoint, *, outtype: str) -> list[TensorPlan]:
    """Every text tensor in llama.cpp's order, mapped with gguf's LLaMA name map."""
    t = ckpt.config.text
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, t.num_hidden_layers)
    wide = gguf.GGMLQuantizationType.F16 if outtype == "f16" else gguf.GGMLQuantizationType.F32
    plans: list[TensorPlan] = []

    def add(src: str, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        ref = ckpt.tensors[src]
        gname = name_map.get_name(src, try_suffixes=(".weight", ".bias"))
        if gname is None:  # cannot happen for the names expected_tensors() lists
            raise CheckpointError(f"{ckpt.path}: no GGUF name for tensor {src}")
        # Norms and other 1-D tensors stay F32, as llama.cpp's converter does.
        qtype = wide if len(ref.shape) > 1 else gguf.GGMLQuantizationType.F32

        def load() -> np.ndarray:
            data = ckpt.read(src)
            return transform(data) if transform else data

        plans.append(TensorPlan(gname, ref.shape, qtype, load))

    add("model.embed_tokens.weight")
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}."
        add(p + "input_layernorm.weight")
        add(p + "self_attn.q_proj.weight", lambda w: permute_qk(w, t.num_attention_heads))
        add(p + "self_attn.k_proj.weight", lambda w: permute_qk(w, t.num_key_value_heads))
        add(p + "self_attn.v_proj.weight")
        add(p + "self_attn.o_proj.weight")
        add(p + "post_attention_layernorm.weight")
        add(p + "mlp.gate_proj.weight")
        add(p + "mlp.up_proj.weight")
        add(p + "mlp.down_proj.weight")
    add("model.norm.weight")
    # Tied checkpoints have no lm_head: omit output.weight and llama.cpp reuses token_embd.
    if ckpt.has("lm_head.weight"):
        add("lm_head.weight")
    return plans
