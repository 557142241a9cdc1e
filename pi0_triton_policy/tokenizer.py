"""The PaliGemma SentencePiece tokenizer, in pi0's prompt format.

pi0 tokens = encode(cleaned, add_bos=True) + encode("\\n"), padded with 0 to 48 (mask True on real tokens),
truncated with a warning past 48. Cleaning: strip(), "_" -> " ", newline -> " ", case kept (OpenPI's
PaligemmaTokenizer). The "\\n" is tokenized on its own: it is the "start of answer" token pi0 was trained with.

The model file is looked up, in order, at an explicit path, in the weights directory, then in OpenPI's
own cache `$OPENPI_DATA_HOME/big_vision/paligemma_tokenizer.model` (default `~/.cache/openpi`), so a
machine that ever ran openpi needs nothing more. A missing file is an error that lists where it looked.

`FallbackTokenizer` is for random weights only (the embedded default with no tokenizer file): it maps
UTF-8 bytes to fixed ids, so prompts still vary the model's input; its ids mean nothing to a trained model.
"""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np

log = logging.getLogger(__name__)

TOKENIZER_FILE = "paligemma_tokenizer.model"
MAX_TOKEN_LEN = 48  # pi0's max_token_len
DEFAULT_OPENPI_DATA_HOME = "~/.cache/openpi"


class TokenizerNotFoundError(FileNotFoundError):
    """No tokenizer file at any of the looked-up places; the message lists them and where to put one."""


def clean_prompt(prompt: str) -> str:
    return prompt.strip().replace("_", " ").replace("\n", " ")


def pad_tokens(ids: list[int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """ids -> (tokens int32 [max_len], mask bool [max_len]); over-long prompts are cut with a warning."""
    if len(ids) > max_len:
        log.warning(
            "prompt is %d tokens, more than max_token_len=%d: truncating to the first %d (OpenPI does the same)",
            len(ids), max_len, max_len,
        )
        ids = ids[:max_len]
    n = len(ids)
    tokens = np.zeros(max_len, dtype=np.int32)
    tokens[:n] = ids
    mask = np.zeros(max_len, dtype=bool)
    mask[:n] = True
    return tokens, mask


class PaligemmaTokenizer:
    """SentencePiece tokenizer in pi0's prompt format. `tokenize(prompt) -> (tokens [48] int32, mask [48] bool)`."""

    is_fallback = False

    def __init__(self, model_path: str | os.PathLike, max_len: int = MAX_TOKEN_LEN):
        import sentencepiece

        self.path = pathlib.Path(model_path)
        self.max_len = max_len
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=self.path.read_bytes())
        except OSError as e:
            raise TokenizerNotFoundError(f"cannot read tokenizer file {str(self.path)!r}: {e}") from e
        except RuntimeError as e:  # sentencepiece's error for a corrupt proto
            raise ValueError(f"{str(self.path)!r} is not a SentencePiece model: {e}") from e
        self.vocab_size = self._sp.get_piece_size()

    def encode_ids(self, prompt: str) -> list[int]:
        """Unpadded pi0 token ids: BOS + text + the separate "\\n" token."""
        return self._sp.encode(clean_prompt(prompt), add_bos=True) + self._sp.encode("\n")

    def tokenize(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        return pad_tokens(self.encode_ids(prompt), self.max_len)

    def describe(self) -> str:
        return f"PaliGemma SentencePiece ({self.path}, {self.vocab_size} pieces)"


class FallbackTokenizer:
    """Stand-in for random weights when no PaliGemma tokenizer file exists. NOT PaliGemma's vocabulary.

    ids: BOS = 2 (PaliGemma's BOS id), then UTF-8 byte b -> BYTE_OFFSET + b, then the byte of "\\n", padded
    with 0: the same layout (BOS + text + "\\n", pad 0, mask, truncation at 48) as the real tokenizer, so
    every shape and mask downstream is exercised.
    """

    is_fallback = True
    BOS_ID = 2
    BYTE_OFFSET = 3

    def __init__(self, max_len: int = MAX_TOKEN_LEN):
        self.max_len = max_len
        self.vocab_size = self.BYTE_OFFSET + 256

    def encode_ids(self, prompt: str) -> list[int]:
        text = clean_prompt(prompt).encode("utf-8")
        return [self.BOS_ID] + [self.BYTE_OFFSET + b for b in text] + [self.BYTE_OFFSET + ord("\n")]

    def tokenize(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        return pad_tokens(self.encode_ids(prompt), self.max_len)

    def describe(self) -> str:
        return "FALLBACK byte tokenizer (not PaliGemma's vocabulary: for random weights only)"


def openpi_data_home() -> pathlib.Path:
    return pathlib.Path(os.environ.get("OPENPI_DATA_HOME", DEFAULT_OPENPI_DATA_HOME)).expanduser()


def tokenizer_search_paths(path: str | os.PathLike | None = None, weights_dir: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """The places looked at, in order."""
    places = []
    if path is not None:
        p = pathlib.Path(path).expanduser()
        places.append(p / TOKENIZER_FILE if p.is_dir() else p)
    if weights_dir is not None:
        places.append(pathlib.Path(weights_dir).expanduser() / TOKENIZER_FILE)
    places.append(openpi_data_home() / "big_vision" / TOKENIZER_FILE)
    return places


def find_tokenizer(path: str | os.PathLike | None = None, weights_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The first existing tokenizer file among `tokenizer_search_paths`, else TokenizerNotFoundError.

    An explicit `path` that does not exist is an error by itself: asking for a file and silently getting
    another one would hide a typo.
    """
    places = tokenizer_search_paths(path, weights_dir)
    if path is not None and not places[0].is_file():
        raise TokenizerNotFoundError(f"tokenizer file {str(places[0])!r} (given explicitly) does not exist")
    for p in places:
        if p.is_file():
            return p
    looked = "\n  ".join(str(p) for p in places)
    raise TokenizerNotFoundError(
        f"PaliGemma tokenizer ({TOKENIZER_FILE}) not found. Looked in:\n  {looked}\n"
        f"Put it in the weights directory or at {openpi_data_home() / 'big_vision' / TOKENIZER_FILE} "
        "(openpi downloads it there from gs://big_vision/paligemma_tokenizer.model), "
        "or pass its path explicitly."
    )


def load_tokenizer(
    path: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    allow_fallback: bool = False,
    max_len: int = MAX_TOKEN_LEN,
):
    """PaligemmaTokenizer from the first file found; with `allow_fallback` (random weights only) a missing
    file gives FallbackTokenizer and a warning instead of an error."""
    try:
        found = find_tokenizer(path, weights_dir)
    except TokenizerNotFoundError as e:
        if not allow_fallback or path is not None:
            raise
        log.warning("%s\nUsing the FALLBACK byte tokenizer: acceptable for random weights only.", e)
        return FallbackTokenizer(max_len)
    tok = PaligemmaTokenizer(found, max_len)
    log.info("tokenizer: %s", tok.describe())
    return tok
