"""GLM tokenizers: a SentencePiece model under GLM-130B's or ChatGLM-6B's id layout.

GLM-130B (icetk): ids [0, 20000) are image tokens, text id = 20000 + SentencePiece id, and the
special tokens follow the text ids: [MASK] [gMASK] [sMASK] eod sop eop ENC dBLOCK (150000..150007
with icetk's 130000-piece ice_text.model); eos = 20002 (SentencePiece `</s>`), pad = 0; the model's
vocabulary is padded to a multiple of 768 (150528).
ChatGLM-6B: text id = SentencePiece id (no image tokens), specials from 130000 ([MASK] [gMASK]
[sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>), pad 3, eos = <eop>, vocabulary 130528; newlines are
`<n>`, tabs `<|tab|>`, runs of 2-80 spaces `<|blank_n|>`.

Special tokens may be written in text as `[MASK]`, `[gMASK]`, `[sMASK]`, `[sop]`, ... and decode
back to that spelling, so text with blanks round-trips.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

from glmjax.errors import InputError
from glmjax.outputs import atomic_dir, atomic_file, check_output

SPECIAL_NAMES = ("MASK", "gMASK", "sMASK", "eod", "sop", "eop", "ENC", "dBLOCK")
CONFIG_FILE = "glmjax_tokenizer.json"
MODEL_FILE = "tokenizer.model"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How SentencePiece ids and special tokens become model ids."""

    name: str
    text_offset: int  # model id of SentencePiece id 0
    vocab_multiple: int  # the model's vocabulary is padded up to a multiple of this
    pad: int  # model id used for padding
    eos_piece: str  # SentencePiece piece that ends a sequence (GLM-130B: </s>)
    eos_is_eop: bool  # ChatGLM's eos is <eop>
    extra_vocab: int  # specials after the text ids (8), then padding
    whitespace_tokens: bool  # ChatGLM: <|tab|> and <|blank_n|>


LAYOUTS = {
    "glm-130b": Layout("glm-130b", text_offset=20000, vocab_multiple=768, pad=0, eos_piece="</s>",
                       eos_is_eop=False, extra_vocab=8, whitespace_tokens=False),
    "chatglm-6b": Layout("chatglm-6b", text_offset=0, vocab_multiple=1, pad=3, eos_piece="</s>",
                         eos_is_eop=True, extra_vocab=528, whitespace_tokens=True),
    # GLM-130B's scheme without icetk's 20000 image ids in front: small models trained from scratch
    # (the demo) spend no softmax on rows no text ever uses
    "compact": Layout("compact", text_offset=0, vocab_multiple=64, pad=0, eos_piece="</s>",
                      eos_is_eop=False, extra_vocab=8, whitespace_tokens=False),
}
NEWLINE_PIECE = "<n>"
USER_SYMBOLS = [NEWLINE_PIECE, "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]
_SPECIAL_RE = re.compile(r"\[(" + "|".join(SPECIAL_NAMES) + r")\]")


def special_ids_for(layout: Layout, num_text: int) -> dict[str, int]:
    """Special token ids: right after the text ids (icetk's 130000 pieces: [MASK] = 150000)."""
    first = layout.text_offset + num_text
    return {name: first + k for k, name in enumerate(SPECIAL_NAMES)}


def model_vocab_size(layout: Layout, num_text: int) -> int:
    """Embedding rows: GLM-130B pads text + specials to a multiple of 768 (150008 -> 150528);
    ChatGLM-6B keeps 520 rows past its 8 specials (130528)."""
    if layout.name == "chatglm-6b":
        return layout.text_offset + num_text + layout.extra_vocab
    used = layout.text_offset + num_text + len(SPECIAL_NAMES)
    return -(-used // layout.vocab_multiple) * layout.vocab_multiple


class GLMTokenizer:
    """Encode/decode text with one SentencePiece model and one Layout."""

    def __init__(self, model_path: str, layout: str = "glm-130b"):
        import sentencepiece as spm

        if layout not in LAYOUTS:
            raise InputError(f"unknown tokenizer layout {layout!r} (known: {', '.join(LAYOUTS)})")
        if not os.path.isfile(model_path):
            raise InputError(f"SentencePiece model not found: {model_path}")
        self.model_path, self.layout = model_path, LAYOUTS[layout]
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise InputError(f"{model_path} is not a SentencePiece model ({str(e).splitlines()[0]})") from None
        self.num_text = self.sp.GetPieceSize()
        self.special_ids = special_ids_for(self.layout, self.num_text)
        self.special_names = {i: n for n, i in self.special_ids.items()}
        self.newline_id = self._piece(NEWLINE_PIECE)
        eos_piece = self.sp.PieceToId(self.layout.eos_piece)
        self.eos_id = self.special_ids["eop"] if self.layout.eos_is_eop else self.layout.text_offset + eos_piece
        self.pad_id = self.layout.pad

    # --- ids --------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size: text ids, specials, padding."""
        return model_vocab_size(self.layout, self.num_text)

    def __getitem__(self, name: str) -> int:
        """Id of a special token by name: tok['gMASK'], tok['sop'], ..."""
        return self.special_ids[name]

    def _piece(self, piece: str) -> int | None:
        i = self.sp.PieceToId(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.IdToPiece(i) else self.layout.text_offset + i

    # --- text -------------------------------------------------------------------------------------
    def _pre(self, text: str) -> list[str]:
        """Split text at newlines (and ChatGLM's tabs / blank runs) into pieces SentencePiece keeps."""
        out = []
        for k, line in enumerate(text.split("\n")):
            if k:
                out.append("\n")
            if self.layout.whitespace_tokens:
                out += [p for p in re.split(r"(\t| {2,80})", line) if p]
            elif line:
                out.append(line)
        return out

    def _encode_plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._pre(text):
            if part == "\n" and self.newline_id is not None:
                ids.append(self.newline_id)
            elif self.layout.whitespace_tokens and part == "\t":
                ids.append(self._piece("<|tab|>"))
            elif self.layout.whitespace_tokens and part.strip(" ") == "" and len(part) >= 2:
                ids.append(self._piece(f"<|blank_{len(part)}|>"))
            else:
                ids += [self.layout.text_offset + i for i in self.sp.EncodeAsIds(part)]
        return ids

    def encode(self, text: str) -> list[int]:
        """Model ids of `text`; `[MASK]`, `[gMASK]`, `[sop]`, ... become their special ids."""
        ids: list[int] = []
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            ids += self._encode_plain(text[pos:m.start()])
            ids.append(self.special_ids[m.group(1)])
            pos = m.end()
        return ids + self._encode_plain(text[pos:])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of model ids; specials print as `[name]`, padding and image ids are dropped."""
        out: list[str] = []
        run: list[int] = []

        def flush():
            if run:
                out.append(self.sp.DecodeIds(run))
                run.clear()

        for i in ids:
            i = int(i)
            if i in self.special_names:
                flush()
                out.append(f"[{self.special_names[i]}]")
                continue
            sp_id = i - self.layout.text_offset
            if not 0 <= sp_id < self.num_text:
                if i >= self.vocab_size or i < 0:
                    raise InputError(f"unknown token id {i}: the vocabulary has {self.vocab_size} ids")
                continue  # padding rows and GLM-130B's image ids carry no text
            piece = self.sp.IdToPiece(sp_id)
            if piece == NEWLINE_PIECE:
                flush()
                out.append("\n")
            elif piece == "<|tab|>":
                flush()
                out.append("\t")
            elif piece.startswith("<|blank_") and piece.endswith("|>"):
                flush()
                out.append(" " * int(piece[8:-2]))
            else:
                run.append(sp_id)
        flush()
        return "".join(out)

    # --- files ------------------------------------------------------------------------------------
    def save(self, out_dir: str) -> None:
        """The SentencePiece model and the layout file into out_dir, each written whole (atomic_file)."""
        import shutil

        os.makedirs(out_dir, exist_ok=True)
        if os.path.abspath(self.model_path) != os.path.abspath(os.path.join(out_dir, MODEL_FILE)):
            with open(self.model_path, "rb") as src, atomic_file(os.path.join(out_dir, MODEL_FILE), "wb") as f:
                shutil.copyfileobj(src, f)
        with atomic_file(os.path.join(out_dir, CONFIG_FILE), "w") as f:
            json.dump({"layout": self.layout.name, "vocab_size": self.vocab_size,
                       "special_ids": self.special_ids, "eos_id": self.eos_id, "pad_id": self.pad_id}, f, indent=2)


def load_tokenizer(path: str) -> GLMTokenizer:
    """A tokenizer directory written by save()/train, or icetk's ice_text.model (GLM-130B layout)."""
    if os.path.isdir(path):
        cfg_path = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(cfg_path):
            raise InputError(f"{path} is not a glmjax tokenizer directory (no {CONFIG_FILE})")
        with open(cfg_path) as f:
            layout = json.load(f).get("layout", "glm-130b")
        return GLMTokenizer(os.path.join(path, MODEL_FILE), layout)
    return GLMTokenizer(path, "glm-130b")


def train_tokenizer(inputs: Sequence[str], vocab_size: int, out_dir: str, layout: str = "glm-130b",
                    max_sentences: int = 2_000_000, *, overwrite: bool = False) -> GLMTokenizer:
    """Train a SentencePiece unigram model on text files and save it with the layout.

    Identity normalisation and kept whitespace make decode(encode(text)) == text; byte fallback
    covers characters the corpus lacks; `<n>` (and ChatGLM's tab/blank tokens) are reserved pieces.
    out_dir is written whole (outputs.atomic_dir); an existing one, which prepared corpora may point
    to, is replaced only with overwrite.
    """
    import shutil

    import sentencepiece as spm

    if layout not in LAYOUTS:
        raise InputError(f"unknown tokenizer layout {layout!r} (known: {', '.join(LAYOUTS)})")
    for p in inputs:
        if not os.path.isfile(p):
            raise InputError(f"tokenizer training input not found: {p}")
        if os.path.getsize(p) == 0:
            raise InputError(f"tokenizer training input is empty: {p}")
    symbols = USER_SYMBOLS if LAYOUTS[layout].whitespace_tokens else [NEWLINE_PIECE]
    check_output(out_dir, directory=True, overwrite=overwrite)
    with atomic_dir(out_dir, overwrite) as tmp:
        scratch = os.path.join(tmp, ".train")  # SentencePiece's own files; not part of the output
        os.mkdir(scratch)
        prefix = os.path.join(scratch, "sp")
        try:
            spm.SentencePieceTrainer.Train(
                input=",".join(inputs), model_prefix=prefix, vocab_size=vocab_size, model_type="unigram",
                character_coverage=0.9995, byte_fallback=True, normalization_rule_name="identity",
                remove_extra_whitespaces=False, split_digits=True, user_defined_symbols=symbols,
                unk_id=0, bos_id=1, eos_id=2, pad_id=3, input_sentence_size=max_sentences, hard_vocab_limit=False,
                shuffle_input_sentence=True, minloglevel=2, num_threads=os.cpu_count() or 1)
        except RuntimeError as e:
            raise InputError(f"tokenizer training failed: {str(e).splitlines()[0]}") from None
        GLMTokenizer(prefix + ".model", layout).save(tmp)
        shutil.rmtree(scratch)
    return load_tokenizer(out_dir)
