"""models.toml: the built-in catalog's content, strict parsing, the user catalog, and `llava models`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_cli import catalog as cat_mod
from llava_cli.catalog import CatalogError, builtin_catalog_path, load_catalog, normalize_bits, parse_catalog
from llava_cli.cli.app import main
from llava_cli.errors import UsageError
from llava_cli.paths import user_dir

MINIMAL = """
[defaults]
model = "m"
bits = "q4_k_m"

[models.m]
description = "a model"
checkpoint = "owner/m-hf"
"""


def parse(text: str, name: str = "cat.toml") -> cat_mod.Catalog:
    return parse_catalog([(text, Path(name))])


def test_builtin_catalog_content() -> None:
    cat = load_catalog()
    assert cat.default_model == "llava-1.5-7b" and cat.default_bits == "q4_k_m"
    assert [e.id for e in cat] == ["llava-1.5-7b", "llava-1.5-13b", "bakllava-1", "tiny-random"]
    assert cat.files == (builtin_catalog_path(),)
    # The 13B table this project was specified with, kept as given (llava_cli/models.toml says so).
    q = cat.get("llava-1.5-13b").quantizations
    assert [(b, r.bpw, r.size_gb, r.quality) for b, r in q.items()] == [
        ("q4_k_m", 4.5, 7.9, 94.0),
        ("q6_k", 6.5, 11.1, 97.0),
        ("q8_0", 8.0, 13.6, 100.0),
        ("f16", 16.0, 26.7, 100.0),
    ]
    bak = cat.get("bakllava-1")
    assert bak.architecture is not None and (bak.architecture.kv_heads, bak.architecture.ff) == (8, 14336)
    for entry in cat:
        if entry.source == "hub":
            assert entry.checkpoint and entry.checkpoint.startswith("llava-hf/")
            assert entry.mmproj is not None and entry.mmproj.file.endswith(".gguf")
            assert entry.architecture is not None and entry.architecture.image_tokens == 576
            assert "q4_k_m" in entry.gguf  # the default quantization is downloadable for every hub model
    assert cat.get("llava-1.5-7b").gguf["q4_k_m"].repo == "mys/ggml_llava-v1.5-7b"
    assert "q6_k" not in cat.get("llava-1.5-13b").gguf  # nothing published: converted locally
    tiny = cat.get("tiny-random")
    assert tiny.noise and tiny.default_bits == "f16" and not tiny.gguf
    assert cat.bits_for(tiny, None) == "f16" and cat.bits_for(cat.default, "Q6_K") == "q6_k"


@pytest.mark.parametrize(("given", "want"), [("Q4_K_M", "q4_k_m"), ("q8_0", "q8_0"), ("FP16", "f16"), ("q6-k", "q6_k")])
def test_bits_names_are_case_insensitive(given: str, want: str) -> None:
    assert normalize_bits(given) == want


def test_unknown_bits_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown quantization 'q5'") as info:
        normalize_bits("q5")
    assert "q4_k_m" in (info.value.hint or "")


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ('colour = "red"', "unknown key 'colour'"),
        ('source = "cloud"', "source must be 'hub' or 'synthetic'"),
        ('default_bits = "q5_k"', "unknown quantization 'q5_k'"),
        ("[models.m.architecture]\nlayers = '32'", "architecture.layers must be an integer"),
        ("[models.m.architecture]\nlayers = 0", "architecture.layers must be positive"),
        ("[models.m.architecture]\nlayers = 32", "architecture is missing"),
        ("[models.m.architecture]\nlayers = true", "architecture.layers must be an integer"),
        ("[models.m.gguf.q5_k]\nrepo = 'a/b'\nfile = 'x.gguf'", "gguf: unknown quantization 'q5_k'"),
        ("[models.m.gguf.q4_k_m]\nrepo = 'a/b'\nfile = 'x.bin'", "gguf.q4_k_m.file must be a .gguf file"),
        ("[models.m.gguf.q4_k_m]\nrepo = 'nope'\nfile = 'x.gguf'", "gguf.q4_k_m.repo must look like 'owner/name'"),
        ("[models.m.gguf.q4_k_m]\nrepo = 'a/b'\nfile = 'x.gguf'", "need the [mmproj] file"),
        ("[models.m.mmproj]\nrepo = 'a/b'\nfile = 'p.gguf'\nsha = 'x'", "unknown key 'mmproj.sha'"),
        ("[models.m.quantizations]\nq4_k_m = { bpw = 4.5, size_gb = 4 }", None),
        (
            "[models.m.quantizations]\nq4_k_m = { bpw = 4.5, size_gb = 4, quality = 150 }",
            "quality must be a percentage",
        ),
        ("[models.m.quantizations]\nq4_k_m = { bpw = 4.5 }", "quantizations.q4_k_m needs 'size_gb'"),
        ("[models.m.quantizations]\nq4_k_m = { bpw = 'x', size_gb = 4 }", "bpw must be a number"),
    ],
)
def test_strict_parsing_names_file_entry_and_problem(extra: str, problem: str | None) -> None:
    text = MINIMAL + "\n" + extra + "\n"
    if problem is None:  # the control: this one is valid
        assert parse(text).get("m").quantizations["q4_k_m"].quality is None
        return
    with pytest.raises(CatalogError) as info:
        parse(text)
    msg = info.value.message
    assert msg.startswith("cat.toml, entry 'm': "), msg
    assert problem in msg
    assert "cat.toml" in (info.value.hint or "")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[defaults]\nmodel = 'm'\n[models.m]\ncheckpoint = 'a/b'\n", "missing 'description'"),
        ("[defaults]\nmodel='m'\nbits='q4_k_m'\n[models.m]\ndescription='x'\n", "needs 'checkpoint' or at least one"),
        (MINIMAL.replace('model = "m"', 'model = "zz"'), "default model 'zz' is not in the catalog"),
        (MINIMAL.replace('bits = "q4_k_m"', 'bits = "int3"'), "unknown quantization 'int3'"),
        (MINIMAL + "[models.s]\ndescription='s'\nsource='synthetic'\ncheckpoint='a/b'\n", "takes no checkpoint"),
        (MINIMAL + "[extras]\nx=1\n", "unknown top-level key 'extras'"),
        (MINIMAL + "[models.Bad_Id]\ndescription='x'\ncheckpoint='a/b'\n", "model ids are lowercase"),
        ("[models.m\n", "not valid TOML"),
    ],
)
def test_catalog_level_errors(text: str, problem: str) -> None:
    with pytest.raises(CatalogError, match="cat.toml") as info:
        parse(text)
    assert problem in info.value.message


def test_builtin_toml_is_shipped_in_the_package() -> None:
    path = builtin_catalog_path()
    assert path.parent.name == "llava_cli" and path.is_file()
    assert path.read_text() == (Path(__file__).parents[1] / "models.toml").read_text()


def test_user_catalog_adds_and_overrides() -> None:
    user = user_dir() / "models.toml"
    user.write_text(
        """
[defaults]
model = "my-llava"

[models."llava-1.5-7b".gguf.q4_k_m]
repo = "mirror/llava-7b"   # only this key changes; file and size come from the built-in entry

[models.my-llava]
description = "my fine-tune"
checkpoint = "me/my-llava-hf"
default_bits = "Q8_0"
"""
    )
    cat = load_catalog()
    assert cat.files == (builtin_catalog_path(), user)
    assert cat.default_model == "my-llava" and cat.default_bits == "q4_k_m"
    mine = cat.get("my-llava")
    assert (mine.checkpoint, mine.default_bits, mine.origin) == ("me/my-llava-hf", "q8_0", user)
    q4 = cat.get("llava-1.5-7b").gguf["q4_k_m"]
    assert (q4.repo, q4.file, q4.size_gb) == ("mirror/llava-7b", "ggml-model-q4_k.gguf", 4.08)
    assert cat.get("llava-1.5-7b").description.startswith("LLaVA-1.5 7B")  # untouched fields stay
    assert cat_mod.get("my-llava") == mine


def test_a_bad_user_catalog_names_the_user_file() -> None:
    user = user_dir() / "models.toml"
    user.write_text('[models."llava-1.5-13b".architecture]\nlayerz = 40\n')
    with pytest.raises(CatalogError) as info:
        load_catalog()
    assert info.value.message.startswith(f"{user}, entry 'llava-1.5-13b': unknown key 'architecture.layerz'")


def test_unknown_id_lists_the_known_ones() -> None:
    with pytest.raises(UsageError) as info:
        load_catalog().get("llava-2")
    assert "llava-1.5-7b" in (info.value.hint or "") and "llava models" in (info.value.hint or "")


def test_cli_models_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["default"] == {"model": "llava-1.5-7b", "bits": "q4_k_m"}
    rows = {r["id"]: r for r in data["models"]}
    assert rows["llava-1.5-7b"]["default"] and not rows["llava-1.5-13b"]["default"]
    assert rows["llava-1.5-13b"]["published"] == ["f16", "q4_k_m"]
    assert all(r["local"] == {} and r["size_on_disk"] == 0 for r in rows.values())
    assert rows["tiny-random"]["noise"]


def test_cli_models_table_and_bad_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "llava-1.5-7b (default)" in out and "bakllava-1" in out
    (user_dir() / "models.toml").write_text("[models.x]\ndescription = 1\n")
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert "models.toml, entry 'x': description must be a string" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------- one --bits parser for every command


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--model", "tiny-random", "--bits", "{q}", "What is this?"],
        ["chat", "--model", "tiny-random", "--bits", "{q}"],
        ["pull", "tiny-random", "--bits", "{q}"],
        ["caption", "{dir}", "--out", "{dir}/c.jsonl", "--model", "tiny-random", "--bits", "{q}"],
        ["quantize", "{dir}", "--bits", "{q}"],
    ],
)
def test_every_command_rejects_a_bad_bits_with_the_same_line(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from llava_cli.cli.app import main

    # caption resolves the model only when there is an image to caption (an empty folder finishes without it)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    args = [a.replace("{q}", "q3").replace("{dir}", str(tmp_path)) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unknown quantization 'q3' for --bits: choose one of q4_k_m, q6_k, q8_0, f16" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("spelling", ["f16", "F16", "fp16", "FP16", "float16"])
def test_the_same_spellings_everywhere(spelling: str) -> None:
    from llava_cli import quants
    from llava_cli.memory import quant_label

    assert normalize_bits(spelling) == "f16"  # run / chat / caption / pull (the catalog's bits)
    assert quants.parse_bits(spelling, quants.TEXT_TYPES).name == "f16"  # quantize
    assert quant_label(spelling) == "F16"  # vram-check's table
