"""The PaliGemma tokenizer layer, with a small SentencePiece model trained here (no download)."""

import io
import logging

import numpy as np
import pytest
import sentencepiece as spm

from pi0_triton_policy import tokenizer as tok_mod
from pi0_triton_policy.tokenizer import FallbackTokenizer, PaligemmaTokenizer, TokenizerNotFoundError, load_tokenizer

SENTENCES = [
    "pick up the red cup", "put the bowl on the plate", "fold the towel neatly", "transfer the cube to the other arm",
    "open the drawer and close it", "move the marker into the box", "Transfer cube", "uncap the pen",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny SentencePiece model with PaliGemma's special ids (pad 0, eos 1, bos 2) and "\\n" as a piece."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4), model_writer=buf, vocab_size=60, hard_vocab_limit=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["\n"], add_dummy_prefix=False,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("tok") / "paligemma_tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def test_bos_text_newline_padding_and_mask(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tokens, mask = PaligemmaTokenizer(sp_model).tokenize("pick up the red cup")
    expected = [sp.bos_id()] + sp.encode("pick up the red cup") + sp.encode("\n")
    assert sp.bos_id() == 2 and sp.encode("\n") == [sp.piece_to_id("\n")]
    assert tokens.shape == (48,) and tokens.dtype == np.int32 and mask.dtype == bool
    assert tokens[: len(expected)].tolist() == expected
    assert (tokens[len(expected) :] == 0).all()
    assert mask.tolist() == [True] * len(expected) + [False] * (48 - len(expected))


def test_prompt_cleaning(sp_model):
    tok = PaligemmaTokenizer(sp_model)
    a, _ = tok.tokenize("  pick_up\nthe red cup \n")  # strip, "_" -> " ", newline -> " "
    b, _ = tok.tokenize("pick up the red cup")
    np.testing.assert_array_equal(a, b)
    c, _ = tok.tokenize("Pick up the red cup")  # case is kept
    assert not np.array_equal(b, c)


def test_truncation_at_48_warns(sp_model, caplog):
    tok = PaligemmaTokenizer(sp_model)
    long_prompt = " ".join(SENTENCES * 3)
    full = tok.encode_ids(long_prompt)
    assert len(full) > 48
    with caplog.at_level(logging.WARNING, logger="pi0_triton_policy.tokenizer"):
        tokens, mask = tok.tokenize(long_prompt)
    assert tokens.tolist() == full[:48] and mask.all()
    assert any("truncating" in r.message and str(len(full)) in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pi0_triton_policy.tokenizer"):
        tok.tokenize("fold the towel")
    assert not caplog.records


def test_lookup_order(sp_model, tmp_path, monkeypatch):
    home = tmp_path / "openpi_home"
    (home / "big_vision").mkdir(parents=True)
    cached = home / "big_vision" / "paligemma_tokenizer.model"
    cached.write_bytes(sp_model.read_bytes())
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setenv("OPENPI_DATA_HOME", str(home))

    assert tok_mod.find_tokenizer() == cached  # OpenPI's cache last
    (weights / "paligemma_tokenizer.model").write_bytes(sp_model.read_bytes())
    assert tok_mod.find_tokenizer(weights_dir=weights) == weights / "paligemma_tokenizer.model"
    assert tok_mod.find_tokenizer(path=sp_model, weights_dir=weights) == sp_model  # explicit first
    assert tok_mod.find_tokenizer(path=sp_model.parent) == sp_model  # a directory holding the file works too
    assert isinstance(load_tokenizer(weights_dir=weights), PaligemmaTokenizer)


def test_missing_tokenizer_says_where_it_looked_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path / "home"))
    with pytest.raises(TokenizerNotFoundError) as e:
        load_tokenizer(weights_dir=tmp_path / "w")
    msg = str(e.value)
    assert str(tmp_path / "w" / "paligemma_tokenizer.model") in msg
    assert str(tmp_path / "home" / "big_vision" / "paligemma_tokenizer.model") in msg
    assert "Put it in the weights directory" in msg
    with pytest.raises(TokenizerNotFoundError, match="given explicitly"):
        load_tokenizer(path=tmp_path / "typo.model", allow_fallback=True)  # an explicit path never falls back


def test_fallback_is_stated_and_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="pi0_triton_policy.tokenizer"):
        tok = load_tokenizer(allow_fallback=True)
    assert isinstance(tok, FallbackTokenizer) and tok.is_fallback
    assert any("FALLBACK" in r.message for r in caplog.records)
    tokens, mask = tok.tokenize(" ab_c ")
    assert tokens[:6].tolist() == [2, 3 + ord("a"), 3 + ord("b"), 3 + ord(" "), 3 + ord("c"), 3 + ord("\n")]
    assert mask.sum() == 6 and (tokens[6:] == 0).all()
