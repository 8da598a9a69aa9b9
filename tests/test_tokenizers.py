"""Tokenizers: round trips, agreement with the libraries they wrap, Megatron's vocab padding, clear errors."""

import io
import json
import random

import pytest

from megatron_ext.data.tokenizers import (
    ByteTokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    padded_vocab_size,
)

SAMPLE = "def f(x):\n\treturn x  # café, naïve, über, 日本語, emoji 🚀\n"
WORDS = "def return class import self print value data model train token café naïve über the of".split()


def _lines(n: int = 300) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- byte


def test_byte_round_trip_non_ascii():
    tok = ByteTokenizer()
    ids = tok.tokenize(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8"))
    assert all(type(i) is int for i in ids)
    assert tok.tokenize_array(SAMPLE).tolist() == ids
    assert tok.detokenize(ids) == SAMPLE
    assert (tok.vocab_size, tok.eod, tok.pad, tok.name) == (258, 256, 257, "byte")


def test_byte_detokenize_drops_specials_and_replaces_bad_bytes():
    tok = ByteTokenizer()
    assert tok.detokenize([104, tok.eod, 105, tok.pad, 999, -1]) == "hi"
    assert tok.detokenize([0xFF, 104]) == "\ufffdh"
    assert tok.tokenize("") == [] and tok.detokenize([]) == ""


# --------------------------------------------------------------------------------------- sentencepiece


def _train_sp(path, **options) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_lines()),
        model_writer=model,
        vocab_size=300,
        byte_fallback=True,  # so any text, incl. tabs and non-ASCII, round-trips
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        minloglevel=2,
        **options,
    )
    path.write_bytes(model.getvalue())


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    _train_sp(path)
    return path


def test_sentencepiece_round_trip_and_matches_library(sp_model):
    import sentencepiece as spm

    tok = SentencePieceTokenizer(sp_model)
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    ids = tok.tokenize(SAMPLE)
    assert ids == ref.encode(SAMPLE, out_type=int)
    assert tok.detokenize(ids) == SAMPLE
    assert tok.detokenize(ids + [tok.eod]) == SAMPLE
    assert tok.vocab_size == ref.get_piece_size() > 256
    assert tok.eod == ref.eos_id() == 2
    assert tok.pad == -1  # sentencepiece's default: no pad piece (-1, as megatron-core)
    assert tok.name.startswith("sp-tiny-")


def test_sentencepiece_without_eos_appends_eod(tmp_path):
    import sentencepiece as spm

    path = tmp_path / "noeos.model"
    _train_sp(path, eos_id=-1, pad_id=3)
    tok = SentencePieceTokenizer(path)
    pieces = spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    assert (tok.eod, tok.vocab_size, tok.pad) == (pieces, pieces + 1, 3)
    ids = tok.tokenize("the model")
    assert tok.detokenize(ids + [tok.eod]) == "the model"


def test_gpt_sentencepiece_alias(sp_model):
    a = build_tokenizer("GPTSentencePieceTokenizer", str(sp_model))
    b = build_tokenizer("SentencePieceTokenizer", sp_model)
    assert isinstance(a, SentencePieceTokenizer) and a.name == b.name
    assert a.tokenize(SAMPLE) == b.tokenize(SAMPLE)


# ---------------------------------------------------------------------------------------- hugging face


def _train_hf(special_tokens: list[str]):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_lines(), trainer)
    return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tinybpe"
    folder.mkdir()
    _train_hf(["<|endoftext|>", "<pad>"]).save(str(folder / "tokenizer.json"))
    return folder


def test_huggingface_file_and_folder_match_transformers(hf_dir):
    from transformers import PreTrainedTokenizerFast

    file_json = hf_dir / "tokenizer.json"
    from_file = HuggingFaceTokenizer(file_json)
    from_dir = HuggingFaceTokenizer(hf_dir)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(file_json))
    ids = from_file.tokenize(SAMPLE)
    assert ids == from_dir.tokenize(SAMPLE) == ref.encode(SAMPLE, add_special_tokens=False)
    assert from_file.detokenize(ids + [from_file.eod]) == SAMPLE
    assert from_file.name == from_dir.name and from_file.name.startswith("hf-tinybpe-")
    # A bare tokenizer.json declares no eos token: the conventional spelling in its vocab is used.
    assert from_file.eod == ref.get_vocab()["<|endoftext|>"]
    assert from_file.vocab_size == len(ref)
    assert from_file.pad == -1


def test_huggingface_saved_folder_uses_declared_eos_and_pad(hf_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(
        tokenizer_file=str(hf_dir / "tokenizer.json"), eos_token="<|endoftext|>", pad_token="<pad>"
    )
    ref.save_pretrained(str(tmp_path / "saved"))
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "saved"))
    assert (tok.eod, tok.pad) == (ref.eos_token_id, ref.pad_token_id)
    assert tok.tokenize(SAMPLE) == ref.encode(SAMPLE, add_special_tokens=False)


def test_huggingface_without_eos_appends_eod(tmp_path):
    _train_hf(["<unk>"]).save(str(tmp_path / "tokenizer.json"))
    tok = HuggingFaceTokenizer(tmp_path / "tokenizer.json")
    size = tok.vocab_size - 1
    assert tok.eod == size
    assert tok.detokenize(tok.tokenize("the data") + [tok.eod]) == "the data"


def test_huggingface_never_downloads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--tokenizer-model 'gpt2'.*nothing is downloaded"):
        build_tokenizer("HuggingFaceTokenizer", "gpt2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--tokenizer-model"):
        HuggingFaceTokenizer(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------- shared


def test_unique_identifiers_are_json(sp_model, hf_dir):
    # megatron-core hashes json.dumps(config.tokenizer.unique_identifiers) into its dataset cache key.
    for tok in (ByteTokenizer(), SentencePieceTokenizer(sp_model), HuggingFaceTokenizer(hf_dir)):
        assert isinstance(tok, Tokenizer)
        blob = json.dumps(tok.unique_identifiers)
        assert tok.name in blob and str(tok.vocab_size) in blob


@pytest.mark.parametrize(
    "vocab, divisible_by, tp, expected",
    [
        (258, 128, 2, 512),
        (258, 128, 1, 384),
        (256, 128, 1, 256),
        (32000, 128, 1, 32000),
        (50257, 128, 1, 50304),
        (50257, 128, 8, 51200),
        (1, 1, 1, 1),
    ],
)
def test_padded_vocab_size(vocab, divisible_by, tp, expected):
    assert padded_vocab_size(vocab, divisible_by, tp) == expected


def test_padded_vocab_size_rejects_nonpositive():
    with pytest.raises(ValueError):
        padded_vocab_size(258, 0, 1)


@pytest.mark.parametrize(
    "tokenizer_type, model, pattern",
    [
        ("WordPiece", None, "--tokenizer-type 'WordPiece' is unknown; expected one of ByteTokenizer"),
        ("SentencePieceTokenizer", None, "--tokenizer-model is required .*SentencePiece .model"),
        ("HuggingFaceTokenizer", "", "--tokenizer-model is required .*tokenizer.json"),
        ("SentencePieceTokenizer", "/nonexistent/x.model", "--tokenizer-model '/nonexistent/x.model': no "),
        ("HuggingFaceTokenizer", "/nonexistent/tok", "--tokenizer-model '/nonexistent/tok': no such"),
    ],
)
def test_build_tokenizer_errors_name_the_option(tokenizer_type, model, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        build_tokenizer(tokenizer_type, model)
    assert "\n" not in str(info.value)


def test_sentencepiece_rejects_non_model_file(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    with pytest.raises(ValueError, match="--tokenizer-model .*not a SentencePiece model"):
        SentencePieceTokenizer(bad)


def test_build_byte_tokenizer_ignores_model():
    assert isinstance(build_tokenizer("ByteTokenizer", None), ByteTokenizer)
