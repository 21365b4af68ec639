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


def test_the_dataset_child_loads_the_named_class_without_transformers_modeling_imports(tokenizers, tmp_path):
    """The dataset child (data/prepare_ahead.py) loads the class tokenizer_config.json names, without the
    modeling and generation modules AutoTokenizer's import brings: same class, same ids, same template."""
    import json
    import subprocess
    import sys

    hf, _ = tokenizers
    probe = ("import json, sys\n"
             "from finetune_trainer.train.model_loading import BaseModel, load_tokenizer\n"
             f"tok = load_tokenizer(BaseModel({str(gemma_tokenizer_dir())!r}), direct=True)\n"
             "print(json.dumps({'class': type(tok).__name__, 'ids': [tok(s)['input_ids'] for s in sys.argv[1:]],\n"
             "  'template': tok.chat_template, 'special': [tok.bos_token, tok.eos_token, tok.pad_token],\n"
             "  'modeling': sorted(m for m in sys.modules if m.startswith(('transformers.generation',\n"
             "                      'transformers.models.auto.modeling_auto', 'sklearn')))}))\n")
    out = json.loads(subprocess.run([sys.executable, "-c", probe, *SAMPLES], capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    assert out["class"] == type(hf).__name__
    assert out["ids"] == [hf(s)["input_ids"] for s in SAMPLES]
    assert out["template"] == hf.chat_template
    assert out["special"] == [hf.bos_token, hf.eos_token, hf.pad_token]
    assert out["modeling"] == []


@pytest.mark.parametrize("config, expected", [
    ({"tokenizer_class": "GemmaTokenizer"}, "GemmaTokenizer"),
    ({"tokenizer_class": "GemmaTokenizerFast"}, "GemmaTokenizer"),  # AutoTokenizer drops "Fast" first
    ({"tokenizer_class": "GemmaTokenizer", "auto_map": {"AutoTokenizer": ["x.Tok", None]}}, None),  # custom code
    ({"tokenizer_class": "AutoModelForCausalLM"}, None),  # exported, but not a tokenizer
    ({"tokenizer_class": "NoSuchTokenizer"}, None),
    ({"tokenizer_class": "os.system"}, None),  # not a plain name
    ({}, None),
    ("not a mapping", None),
], ids=["named", "fast-suffix", "auto-map", "not-a-tokenizer", "unknown", "dotted", "unnamed", "not-json-object"])
def test_the_named_tokenizer_class_is_only_a_transformers_tokenizer(tmp_path, config, expected):
    import json

    from finetune_trainer.train.model_loading import BaseModel, named_tokenizer_class

    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    cls = named_tokenizer_class(BaseModel(str(tmp_path)))
    assert (cls.__name__ if cls is not None else None) == expected
    assert named_tokenizer_class(BaseModel(str(tmp_path / "missing"))) is None
