"""GLM tokenizers: GLM-130B's and ChatGLM-6B's id layouts, bilingual round trips, the CLI."""
import io
import sys

import pytest
from helpers import bilingual_lines

from glmjax.cli import main
from glmjax.data.tokenizer import LAYOUTS, load_tokenizer, model_vocab_size, special_ids_for, train_tokenizer
from glmjax.errors import InputError


@pytest.fixture(scope="module", params=["glm-130b", "chatglm-6b", "compact"])
def tok(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text("\n".join(bilingual_lines(4000, 0)) + "\n", encoding="utf-8")
    return train_tokenizer([str(d / "corpus.txt")], 2000, str(d / "out"), layout=request.param)


def test_glm130b_id_layout_with_icetks_130000_pieces():
    layout = LAYOUTS["glm-130b"]
    ids = special_ids_for(layout, 130000)
    assert ids == {"MASK": 150000, "gMASK": 150001, "sMASK": 150002, "eod": 150003, "sop": 150004,
                   "eop": 150005, "ENC": 150006, "dBLOCK": 150007}
    assert model_vocab_size(layout, 130000) == 150528
    chat = LAYOUTS["chatglm-6b"]
    assert special_ids_for(chat, 130000)["MASK"] == 130000 and special_ids_for(chat, 130000)["sop"] == 130004
    assert model_vocab_size(chat, 130000) == 130528


def test_trained_tokenizer_follows_its_layout(tok):
    if tok.layout.name == "glm-130b":
        assert tok["MASK"] == 20000 + tok.num_text and tok["dBLOCK"] == tok["MASK"] + 7
        assert tok.eos_id == 20002 and tok.pad_id == 0 and tok.newline_id == 20004  # </s>, pad, <n> as icetk
        assert tok.vocab_size % 768 == 0 and tok.vocab_size >= tok["dBLOCK"] + 1
        assert all(i >= 20000 for i in tok.encode("hello 你好\nworld"))  # below 20000: image ids
    elif tok.layout.name == "compact":  # GLM-130B's scheme with text from id 0
        assert tok["MASK"] == tok.num_text and tok.eos_id == 2 and tok.pad_id == 0 and tok.newline_id == 4
        assert tok.vocab_size % 64 == 0 and tok.vocab_size >= tok["dBLOCK"] + 1 and tok.eos_id != tok["eop"]
    else:
        assert tok["MASK"] == tok.num_text and tok.eos_id == tok["eop"] and tok.pad_id == 3
        assert tok.vocab_size == tok.num_text + 528
        assert tok.decode(tok.encode("a\tb    c")) == "a\tb    c"
        assert len(tok.encode("    ")) == 1  # a blank run is one <|blank_4|> token


def test_bilingual_text_round_trips(tok):
    held_out = bilingual_lines(200, 1)
    text = "\n".join(held_out)
    assert tok.decode(tok.encode(text)) == text
    for line in held_out[:50]:
        assert tok.decode(tok.encode(line)) == line
    odd = "Ünïcödé ½ and emoji 😀 and  two spaces\nnew line [MASK] 中文 [gMASK][sop] end [sMASK]"
    assert tok.decode(tok.encode(odd)) == odd  # byte fallback and whitespace are kept


def test_special_tokens_written_in_text(tok):
    ids = tok.encode("清华大学[MASK]北京 [gMASK]")
    assert ids.count(tok["MASK"]) == 1 and ids[-1] == tok["gMASK"]
    assert tok.decode([tok["sop"], tok["eop"]]) == "[sop][eop]"
    with pytest.raises(InputError, match="unknown token id"):
        tok.decode([tok.vocab_size + 5])


def test_a_bare_sentencepiece_model_loads_with_glm130b_layout(tok, tmp_path):
    """icetk's ice_text.model is a bare SentencePiece file: it loads under GLM-130B's layout."""
    tok.save(str(tmp_path / "t"))
    bare = load_tokenizer(str(tmp_path / "t" / "tokenizer.model"))
    assert bare.layout.name == "glm-130b" and bare["MASK"] == 20000 + bare.num_text


def test_tokenizer_cli_round_trip(tok, monkeypatch, capsys, tmp_path):
    tok.save(str(tmp_path / "t"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("GLM 通用语言模型 [MASK]\n"))
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "t")]) == 0
    ids = capsys.readouterr().out
    assert [int(x) for x in ids.split()] == tok.encode("GLM 通用语言模型 [MASK]")
    monkeypatch.setattr(sys, "stdin", io.StringIO(ids))
    assert main(["tokenizer", "decode", "--tokenizer", str(tmp_path / "t")]) == 0
    assert capsys.readouterr().out == "GLM 通用语言模型 [MASK]\n"
    assert load_tokenizer(str(tmp_path / "t")).encode("x") == tok.encode("x")


@pytest.mark.parametrize("argv, msg", [
    (["tokenizer", "train", "--input", "MISSING", "--out", "OUT"], "tokenizer training input not found"),
    (["tokenizer", "train", "--input", "EMPTY", "--out", "OUT"], "tokenizer training input is empty"),
    (["tokenizer", "train", "--out", "OUT"], "needs --input FILES and --out DIR"),
    (["tokenizer", "encode", "--tokenizer", "OUT"], "is not a glmjax tokenizer directory"),
    (["tokenizer", "encode"], "needs --tokenizer DIR"),
])
def test_tokenizer_bad_input(tmp_path, capsys, argv, msg):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "out").mkdir()
    argv = [a.replace("MISSING", str(tmp_path / "none.txt")).replace("EMPTY", str(tmp_path / "empty.txt"))
            .replace("OUT", str(tmp_path / "out")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glmjax: error: ") and msg in err, err
