"""The SentencePiece tokenizer rebuilt from the GGUF's fields must tokenize exactly as llama.cpp does
with that same GGUF (transformers 5.17's own GGUF tokenizer splits into characters)."""

from __future__ import annotations

import pytest

from finetune_trainer.train.gguf_tokenizer import BYTE, CONTROL, UNKNOWN, USER_DEFINED
from tests.trainer_fixtures import gemma_tokenizer_dir, real_gguf

SAMPLES = [
    "Hello world!", "  two  spaces\n\nnew paragraph", "12345 numbers, 3.14159 and 1,000,000",
    "<start_of_turn>user\nWhat is LoRA?<end_of_turn>\n<start_of_turn>model\n",
    "Ünïcödé: ßtraße naïve café, 日本語のテキスト, emoji 🤖🙂", "\t\ttabs and    four spaces",
    " leading space", "trailing spaces   ", "code:\n    def f(x):\n        return x ** 2\n",
    "<b>bold</b> and <table><tr><td>cell</td></tr></table>", "math ∑∫√ and arrows → ←",
    "windows\r\nline endings", "", "a", "URL https://example.com/path?q=1&r=2#frag",
    "Mixed-CASE camelCase snake_case SCREAMING_CASE", "quotes \"double\" 'single' «guillemets»",
    "<unused5> is a control token, <mask> too", "\n\n\n\n", "ends with newline\n",
]


@pytest.fixture(scope="module")
def tokenizers():
    import llama_cpp
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gemma_tokenizer_dir()))
    llm = llama_cpp.Llama(str(real_gguf()), vocab_only=True, verbose=False)
    yield hf, llm
    llm.close()


@pytest.mark.parametrize("special", [True, False], ids=["parse-special", "plain-text"])
def test_rebuilt_tokenizer_matches_llama_cpp(tokenizers, special):
    hf, llm = tokenizers
    for text in SAMPLES:
        ours = hf(text, add_special_tokens=True, split_special_tokens=not special)["input_ids"]
        theirs = llm.tokenize(text.encode(), add_bos=True, special=special)
        assert ours == theirs, f"{text!r}: {ours} != {theirs}"
        assert ours[0] == hf.bos_token_id
        assert hf.decode(ours[1:], skip_special_tokens=False) == text


def test_sentencepiece_model_keeps_the_gguf_vocabulary():
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((gemma_tokenizer_dir() / "tokenizer.model").read_bytes())
    types = [p.type for p in proto.pieces]
    assert len(proto.pieces) == 262144
    assert proto.trainer_spec.model_type == pb.TrainerSpec.BPE and proto.trainer_spec.byte_fallback
    assert types[3] == UNKNOWN and proto.pieces[3].piece == "<unk>"
    assert types.count(BYTE) == 256 and types.count(USER_DEFINED) > 100
    assert types[105] == CONTROL and proto.pieces[105].piece == "<start_of_turn>"
    sp = spm.SentencePieceProcessor(model_file=str(gemma_tokenizer_dir() / "tokenizer.model"))
    assert sp.bos_id() == 2 and sp.eos_id() == 1 and sp.pad_id() == 0
    assert sp.decode(sp.encode("round trip ✓")) == "round trip ✓"
