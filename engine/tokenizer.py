"""The SentencePiece text tokenizer and the role prompt's `<system>` wrapping."""
from __future__ import annotations

from pathlib import Path

from .config import TEXT_EPAD, TEXT_PAD
from .errors import UserError

MAX_PROMPT_TOKENS = 1000  # 80 s of the model's 240 s context
PADDING = (TEXT_EPAD, TEXT_PAD)  # ids that say nothing: no piece is shown for them
_JSON_NAMES = {TEXT_EPAD: "EPAD", TEXT_PAD: "PAD"}  # the offline tool's names for them


class PromptError(UserError, ValueError):
    """A role prompt the model cannot take; the message says why."""


def wrap_with_system_tags(text: str) -> str:
    cleaned = text.strip()
    if cleaned.startswith("<system>") and cleaned.endswith("<system>"):
        return cleaned
    return f"<system> {cleaned} <system>"


class Tokenizer:
    def __init__(self, path: str | Path, vocab_size: int | None = None):
        import sentencepiece

        path = Path(path)
        self.path = path
        if not path.is_file():
            raise UserError(f"tokenizer '{path}' does not exist")
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception as e:
            raise UserError(f"'{path}' is not a SentencePiece model ({e})") from None
        if vocab_size is not None and self.sp.GetPieceSize() > vocab_size:
            raise UserError(f"tokenizer '{path}' has {self.sp.GetPieceSize()} pieces, the model only {vocab_size}")

    def encode_prompt(self, text: str) -> list[int]:
        if "\x00" in text:
            raise PromptError("the role prompt contains a NUL character")
        if not text.strip():
            raise PromptError("the role prompt is empty")
        ids = self.sp.Encode(wrap_with_system_tags(text))
        if len(ids) > MAX_PROMPT_TOKENS:
            raise PromptError(f"the role prompt is {len(ids)} tokens long; at most {MAX_PROMPT_TOKENS} fit")
        return ids

    def piece(self, token: int) -> str | None:
        """The text a client shows for a token, or None for padding (ids 0 and 3) and for ids
        the tokenizer does not have (a model whose text vocabulary is larger than it)."""
        token = int(token)
        if token in PADDING or not 0 <= token < self.sp.GetPieceSize():
            return None
        return self.sp.IdToPiece(token).replace("\u2581", " ")

    def json_piece(self, token: int) -> str:
        """The offline tool's text entry: padding as its name, anything else as its piece."""
        token = int(token)
        if token in _JSON_NAMES:
            return _JSON_NAMES[token]
        p = self.piece(token)
        return "<unk>" if p is None else p
