import pytest

from engine.tokenizer import MAX_PROMPT_TOKENS, PromptError, Tokenizer, wrap_with_system_tags

from conftest import TINY


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TINY / "tokenizer.model", vocab_size=256)


def test_system_tags_wrap_once():
    assert wrap_with_system_tags("  Hi there. ") == "<system> Hi there. <system>"
    assert wrap_with_system_tags("<system> x <system>") == "<system> x <system>"


def test_pieces_as_clients_and_the_offline_tool_show_them(tok):
    assert tok.piece(0) is None and tok.piece(3) is None
    assert tok.json_piece(0) == "EPAD" and tok.json_piece(3) == "PAD"
    assert tok.json_piece(2) == "</s>"  # only ids 0 and 3 are named, as in the reference
    word = next(i for i in range(4, 256) if tok.sp.IdToPiece(i).startswith("\u2581"))
    assert tok.piece(word).startswith(" ")


def test_ids_beyond_the_tokenizer_are_not_text(tok):
    assert tok.piece(31999) is None and tok.piece(-5) is None
    assert tok.json_piece(31999) == "<unk>"


def test_bad_prompts(tok):
    with pytest.raises(PromptError, match="empty"):
        tok.encode_prompt("   ")
    with pytest.raises(PromptError, match="NUL"):
        tok.encode_prompt("a\x00b")
    with pytest.raises(PromptError, match=f"at most {MAX_PROMPT_TOKENS}"):
        tok.encode_prompt("word " * 5000)
