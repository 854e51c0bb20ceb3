"""Corpus -> token shards on disk -> GLM sequences -> global batches on the mesh, deterministically.

`prepare` tokenizes text/jsonl files once into numpy-memmap shards with an index:
  DIR/manifest.json          tokenizer layout and ids, shard list, statistics of the run
  DIR/tokens-NNNNN.bin       uint32 token ids of whole documents, back to back
  DIR/docs-NNNNN.npy         int64 [n_docs + 1] document offsets into the shard
  DIR/instructions.jsonl.npz instruction samples (input/target ids), when given
With workers > 1, blocks of the input (cut on document boundaries) are tokenised by that many
processes and written in input order, so the directory is byte for byte the one a single process writes.

The loader makes sequence number i of the run from its own chunk of the shuffled document stream
(`seq_length` tokens, documents separated by eos; an epoch reshuffles) with a random generator seeded
by (seed, i). So any host computes any sequence without the others: host h of H takes rows
[h*B/H, (h+1)*B/H) of each global batch, the global batch sequence does not depend on H, and the
loader's whole state is the next sequence number. The index is arrays (about 8 bytes per document
with an epoch's order; no Python object per document), each process builds only its rows
(`GLMLoader.rows_at`), and a `Prefetcher` thread builds the next micro-batches while a step runs.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import glob
import io
import itertools
import json
import multiprocessing
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np

from glmjax.data.objective import Ids, ObjectiveConfig, Sample, TokenStream, make_sequence
from glmjax.data.tokenizer import GLMTokenizer, load_tokenizer
from glmjax.errors import InputError
from glmjax.outputs import inside

MANIFEST = "manifest.json"
SHARD_TOKENS = 64 << 20  # tokens per shard file (256 MB of uint32)
MAX_WARNINGS = 20


@dataclasses.dataclass
class Stats:
    files: int = 0
    lines: int = 0
    documents: int = 0
    tokens: int = 0
    empty_files: int = 0
    bad_utf8: int = 0
    bad_json: int = 0
    missing_field: int = 0
    instructions: int = 0
    long_documents: int = 0  # longer than a sequence: split across sequences, never dropped
    warnings: list[str] = dataclasses.field(default_factory=list)

    def warn(self, msg: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            print(f"glmjax: warning: {msg}", file=sys.stderr)
        self.warnings.append(msg)


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files of the given paths/globs, sorted; a pattern that matches nothing is an error."""
    files: list[str] = []
    for p in patterns:
        hits = sorted(glob.glob(p, recursive=True))
        if not hits:
            raise InputError(f"input not found: {p}")
        files += [h for h in hits if os.path.isfile(h)]
    return sorted(dict.fromkeys(files))


def _documents_of_lines(lines: Iterable[bytes], path: str, first_line: int, jsonl: bool, stats: Stats,
                        text_field: str) -> Iterator[str]:
    """Documents of raw lines numbered from `first_line`: jsonl objects' `text_field`, or blank-line
    separated paragraphs; each bad line counted in `stats`, warned about and skipped."""
    para: list[str] = []
    for lineno, raw in enumerate(lines, first_line):
        stats.lines += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            stats.bad_utf8 += 1
            stats.warn(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start}); line skipped")
            continue
        if jsonl:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                stats.bad_json += 1
                stats.warn(f"{path}:{lineno}: not JSON ({e.msg}); line skipped")
                continue
            if not isinstance(obj, dict):
                stats.bad_json += 1
                stats.warn(f"{path}:{lineno}: a JSON {type(obj).__name__}, not an object; line skipped")
                continue
            if not isinstance(obj.get(text_field), str):
                stats.missing_field += 1
                stats.warn(f"{path}:{lineno}: no string field {text_field!r}; line skipped")
                continue
            yield obj[text_field]
        elif line.strip():
            para.append(line)
        elif para:
            yield "".join(para).rstrip("\n")
            para = []
    if para:
        yield "".join(para).rstrip("\n")


def _is_jsonl(path: str) -> bool:
    """A .jsonl/.json file holds one document object per line; anything else is text."""
    return path.endswith((".jsonl", ".json"))


def read_documents(path: str, stats: Stats, text_field: str = "text") -> Iterator[str]:
    """Documents of a .txt file (blank-line separated paragraphs) or a .jsonl file (`text_field`)."""
    stats.files += 1
    if os.path.getsize(path) == 0:
        stats.empty_files += 1
        stats.warn(f"{path}: empty file")
        return
    with open(path, "rb") as f:
        yield from _documents_of_lines(f, path, 1, _is_jsonl(path), stats, text_field)


def read_instructions(path: str, stats: Stats) -> Iterator[tuple[str, str]]:
    """(input, target) pairs of a jsonl file of {"input": ..., "target": ...} objects."""
    stats.files += 1
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                stats.bad_utf8 += 1
                stats.warn(f"{path}:{lineno}: not UTF-8; line skipped")
                continue
            except json.JSONDecodeError as e:
                stats.bad_json += 1
                stats.warn(f"{path}:{lineno}: not JSON ({e.msg}); line skipped")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("input"), str) or \
                    not isinstance(obj.get("target"), str):
                stats.missing_field += 1
                stats.warn(f"{path}:{lineno}: needs an object with string 'input' and 'target'; line skipped")
                continue
            yield obj["input"], obj["target"]


# --- parallel tokenisation: the input cut into blocks on document boundaries, tokenised in order ----
BLOCK_BYTES = 1 << 20  # input bytes per tokenisation task (a block also ends on a document boundary)


@dataclasses.dataclass(frozen=True)
class _Block:
    """Whole lines of one input file, starting and ending on a document boundary."""

    path: str
    first_line: int
    data: bytes
    text_field: str
    opens_file: bool  # the file's first block: it counts the file (and warns when the file is empty)


class _QuietStats(Stats):
    """A block's statistics: warnings kept for the parent to print in input order, none printed here."""

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)


@dataclasses.dataclass(frozen=True)
class _Tokenized:
    """A block's non-empty documents as ids back to back, their lengths, and what reading it counted."""

    tokens: np.ndarray  # uint32
    lengths: np.ndarray  # int64, one per document
    stats: Stats


def _last_boundary(chunk: bytes, previous: bytes, jsonl: bool) -> int:
    """Where in `chunk` (which follows the byte `previous`) the last document boundary ends, or -1:
    after a newline for jsonl; after a line that is only a newline for text (a paragraph break)."""
    if jsonl:
        i = chunk.rfind(b"\n")
        return i + 1 if i >= 0 else -1
    a, b = chunk.rfind(b"\n\n"), chunk.rfind(b"\n\r\n")
    if a >= 0 or b >= 0:
        return max(a + 2 if a >= 0 else 0, b + 3 if b >= 0 else 0)
    if previous == b"\n" and chunk.startswith(b"\n"):
        return 1
    return 2 if previous == b"\n" and chunk.startswith(b"\r\n") else -1


def _blocks(path: str, text_field: str) -> Iterator[_Block]:
    """The file in blocks of about BLOCK_BYTES, each cut at the last document boundary it holds."""
    if os.path.getsize(path) == 0:
        yield _Block(path, 1, b"", text_field, True)
        return
    jsonl, line, first = _is_jsonl(path), 1, True
    parts: list[bytes] = []
    previous = b""
    with open(path, "rb") as f:
        while chunk := f.read(BLOCK_BYTES):
            cut = _last_boundary(chunk, previous, jsonl)
            previous = chunk[-1:]
            if cut < 0:
                parts.append(chunk)
                continue
            data = b"".join([*parts, chunk[:cut]])
            yield _Block(path, line, data, text_field, first)
            line, first, parts = line + data.count(b"\n"), False, [chunk[cut:]]
    data = b"".join(parts)
    if data:
        yield _Block(path, line, data, text_field, first)


_WORKER_TOKENIZER: GLMTokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    """A tokenisation worker process loads the tokenizer once."""
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_dir)


def _tokenize(block: _Block, tok: GLMTokenizer | None = None) -> _Tokenized:
    """The documents of one block, tokenised (in a worker process, or here when `tok` is given)."""
    tok = tok or _WORKER_TOKENIZER
    assert tok is not None, "worker started without _init_worker"
    stats = _QuietStats()
    if block.opens_file:
        stats.files += 1
        if not block.data:
            stats.empty_files += 1
            stats.warn(f"{block.path}: empty file")
    docs = _documents_of_lines(io.BytesIO(block.data), block.path, block.first_line, _is_jsonl(block.path),
                               stats, block.text_field)
    ids = [x for x in map(tok.encode, docs) if x]
    lengths = np.array([len(x) for x in ids], np.int64)
    tokens = np.fromiter(itertools.chain.from_iterable(ids), np.uint32, count=int(lengths.sum()))
    return _Tokenized(tokens, lengths, stats)


def _tokenized_in_order(blocks: Iterator[_Block], tok: GLMTokenizer, tokenizer_dir: str,
                        workers: int) -> Iterator[_Tokenized]:
    """Every block tokenised, in input order: here for one worker, else by `workers` spawned processes
    with at most 2 blocks per worker in flight (memory stays bounded whatever the corpus size)."""
    if workers == 1:
        yield from (_tokenize(b, tok) for b in blocks)
        return
    ctx = multiprocessing.get_context("spawn")  # never fork a parent that may hold jax's threads
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer_dir,))
    pending: collections.deque[Future[_Tokenized]] = collections.deque()
    try:
        for b in blocks:
            pending.append(pool.submit(_tokenize, b))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _ShardWriter:
    """Documents -> tokens-NNNNN.bin + docs-NNNNN.npy; a shard closes once it holds SHARD_TOKENS tokens."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.shards: list[dict[str, Any]] = []
        self._tokens: list[np.ndarray] = []
        self._ends: list[np.ndarray] = []
        self._size = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents (ids back to back and their lengths), closing shards as they fill."""
        pos = done = 0
        while done < len(lengths):
            ends = self._size + np.cumsum(lengths[done:])
            full = int(np.searchsorted(ends, SHARD_TOKENS, side="left"))  # the document that fills the shard
            take = min(full + 1, len(ends))
            n = int(ends[take - 1]) - self._size
            self._tokens.append(tokens[pos:pos + n])
            self._ends.append(ends[:take])
            self._size, pos, done = int(ends[take - 1]), pos + n, done + take
            if self._size >= SHARD_TOKENS:
                self.flush()

    def flush(self) -> None:
        """Write the open shard, if it holds any document."""
        if not self._tokens:
            return
        k = len(self.shards)
        data = np.concatenate(self._tokens).astype(np.uint32)
        data.tofile(os.path.join(self.out_dir, f"tokens-{k:05d}.bin"))
        offsets = np.concatenate([np.zeros(1, np.int64), *self._ends]).astype(np.int64)
        np.save(os.path.join(self.out_dir, f"docs-{k:05d}.npy"), offsets)
        self.shards.append({"tokens": f"tokens-{k:05d}.bin", "docs": f"docs-{k:05d}.npy",
                            "n_tokens": int(data.size), "n_docs": len(offsets) - 1})
        self._tokens, self._ends, self._size = [], [], 0


def _add_counts(total: Stats, part: Stats) -> None:
    """A block's counts into the run's, its warnings printed now (so in input order, capped)."""
    for f in dataclasses.fields(Stats):
        if f.name != "warnings":
            setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))
    for msg in part.warnings:
        total.warn(msg)


def prepare(inputs: Sequence[str], tokenizer_dir: str, out_dir: str, *, instructions: Sequence[str] = (),
            text_field: str = "text", seq_length: int = 2048, workers: int = 1) -> Stats:
    """Tokenize a corpus once into shards (see the module docstring). Writes into out_dir/.

    `workers` > 1 tokenises in that many processes; the output is byte for byte the same."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"--workers must be an integer >= 1, got {workers!r}")
    tok = load_tokenizer(tokenizer_dir)
    files = expand_inputs(inputs)
    stats = Stats()
    os.makedirs(out_dir, exist_ok=True)
    writer = _ShardWriter(out_dir)
    blocks = (b for path in files for b in _blocks(path, text_field))
    for part in _tokenized_in_order(blocks, tok, tokenizer_dir, workers):
        _add_counts(stats, part.stats)
        stats.documents += len(part.lengths)
        stats.tokens += int(part.lengths.sum())
        stats.long_documents += int((part.lengths > seq_length).sum())
        writer.add(part.tokens, part.lengths)
    writer.flush()
    if not writer.shards:
        raise InputError(f"no documents in {', '.join(inputs)} (all files empty or unreadable)")
    instr_file = _write_instructions(tok, instructions, out_dir, stats)
    manifest = {"format": "glmjax-tokens", "version": 1, "tokenizer": os.path.abspath(tokenizer_dir),
                "layout": tok.layout.name, "vocab_size": tok.vocab_size, "special_ids": tok.special_ids,
                "eos_id": tok.eos_id, "pad_id": tok.pad_id, "sentence_ends": _sentence_ends(tok),
                "shards": writer.shards, "instructions": instr_file,
                "stats": {k: v for k, v in dataclasses.asdict(stats).items() if k != "warnings"}}
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return stats


def _write_instructions(tok: GLMTokenizer, instructions: Sequence[str], out_dir: str, stats: Stats) -> str | None:
    """The instruction samples tokenised into out_dir/instructions.jsonl.npz; its name, or None."""
    if not instructions:
        return None
    pairs = [(tok.encode(i), tok.encode(t)) for p in expand_inputs(instructions)
             for i, t in read_instructions(p, stats)]
    stats.instructions = len(pairs)
    if not pairs:
        return None
    lens = np.array([[len(i), len(t)] for i, t in pairs], np.int64)
    flat = np.concatenate([np.asarray(i + t, np.uint32) for i, t in pairs])
    np.savez(os.path.join(out_dir, "instructions.jsonl.npz"), lengths=lens, tokens=flat)
    return "instructions.jsonl.npz"


def _sentence_ends(tok: GLMTokenizer) -> list[int]:
    ends = []
    for ch in (".", "。", "？", "！", "?", "!", "；"):
        ids = tok.encode(ch)
        if len(ids) == 1:
            ends.append(ids[0])
    return sorted(set(ends))


# --- loading ---------------------------------------------------------------------------------------
_MANIFEST_KEYS = {"shards": list, "special_ids": dict, "eos_id": int, "pad_id": int, "vocab_size": int,
                  "sentence_ends": list}
_SHARD_KEYS = {"tokens": str, "docs": str, "n_tokens": int, "n_docs": int}


def _read_manifest(data_dir: str) -> dict[str, Any]:
    """DIR/manifest.json, checked for the keys the loader uses."""
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise InputError(f"{data_dir} is not a prepared corpus (no {MANIFEST}); run `glmjax data prepare`")
    redo = "; prepare the corpus again (`glmjax data prepare --overwrite`)"
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"corrupt corpus manifest {path}: not JSON ({e}){redo}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "glmjax-tokens":
        raise InputError(f"corrupt corpus manifest {path}: not a glmjax-tokens manifest{redo}")
    for k, kind in _MANIFEST_KEYS.items():
        if not isinstance(manifest.get(k), kind):
            raise InputError(f"corrupt corpus manifest {path}: no {kind.__name__} {k!r}{redo}")
    specials = manifest["special_ids"]
    missing = [n for n in ("MASK", "gMASK", "sMASK", "sop", "eop") if not isinstance(specials.get(n), int)]
    if missing:
        raise InputError(f"corrupt corpus manifest {path}: special_ids lacks {missing[0]!r}{redo}")
    if not manifest["shards"]:
        raise InputError(f"corrupt corpus manifest {path}: it lists no shards{redo}")
    for k, sh in enumerate(manifest["shards"]):
        if not isinstance(sh, dict) or any(not isinstance(sh.get(n), t) for n, t in _SHARD_KEYS.items()):
            raise InputError(f"corrupt corpus manifest {path}: shard {k} needs {', '.join(_SHARD_KEYS)}{redo}")
        if sh["n_docs"] < 0 or sh["n_tokens"] < 0:
            raise InputError(f"corrupt corpus manifest {path}: shard {k} has a negative n_docs or n_tokens{redo}")
    return manifest


def _open_shard(data_dir: str, sh: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens memory-mapped, document offsets) of one shard, both checked against the manifest."""
    where = os.path.join(data_dir, MANIFEST)
    tpath, dpath = inside(data_dir, sh["tokens"], where), inside(data_dir, sh["docs"], where)
    for p in (tpath, dpath):
        if not os.path.isfile(p):
            raise InputError(f"corpus shard file {p} is missing")
    n = os.path.getsize(tpath) // 4
    if n != sh["n_tokens"] or os.path.getsize(tpath) % 4:
        raise InputError(f"{tpath} is truncated ({n} of {sh['n_tokens']} tokens)" if n < sh["n_tokens"] else
                         f"{tpath} holds {n} tokens, its manifest says {sh['n_tokens']}")
    tokens = np.memmap(tpath, np.uint32, mode="r") if n else np.zeros(0, np.uint32)
    try:
        offs = np.load(dpath, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{dpath} is truncated or not an .npy file ({e})") from None
    if (offs.ndim != 1 or offs.dtype.kind not in "iu" or len(offs) != sh["n_docs"] + 1 or offs[0] != 0
            or offs[-1] != n or (np.diff(offs) < 0).any()):
        raise InputError(f"{dpath} does not match its shard: {sh['n_docs'] + 1} increasing offsets from 0 to {n} "
                         f"expected, got {offs.dtype} {list(offs.shape)}")
    return tokens, offs


def _read_instructions_file(path: str) -> list[tuple[list[int], list[int]]]:
    """(input ids, target ids) of the prepared instruction samples."""
    try:
        with np.load(path, allow_pickle=False) as z:
            lengths, flat = z["lengths"], z["tokens"]
    except Exception as e:  # a missing file, a torn zip, a missing array: all the same to the user
        raise InputError(f"corpus instruction file {path} is missing or unreadable ({type(e).__name__}: {e})") from None
    if lengths.ndim != 2 or lengths.shape[1:] != (2,) or (lengths < 0).any() or int(lengths.sum()) != flat.size:
        raise InputError(f"corpus instruction file {path} is inconsistent (lengths do not add up to its tokens)")
    out, pos = [], 0
    for li, lt in lengths:
        ids = flat[pos:pos + li + lt].astype(np.int64).tolist()
        out.append((ids[:li], ids[li:]))
        pos += li + lt
    return out


STARTS_EVERY = 64  # block size of the sampled cumulative positions (index and epoch orders)
_CHUNK = STARTS_EVERY << 14  # documents per vectorised step over the whole corpus (bounds temporaries)


def _block_sums(lengths: np.ndarray, extra: int = 0) -> np.ndarray:
    """Sums (int64) of each run of STARTS_EVERY consecutive lengths + `extra`, the last run possibly short."""
    lens = np.concatenate([lengths.astype(np.int64) + extra, np.zeros(-len(lengths) % STARTS_EVERY, np.int64)])
    return lens.reshape(-1, STARTS_EVERY).sum(axis=1)


class TokenShards:
    """The prepared corpus as documents (memory-mapped shards; nothing read until used).

    The index holds no Python object per document: per shard a memory map of its tokens; for the whole
    corpus the document lengths (uint32 while every shard holds fewer than 2**32 tokens, as `prepare`
    writes them: 4 bytes per document) and the corpus position of every STARTS_EVERY-th document
    (int64, 1/8 byte per document). Opening checks the manifest and every shard against it, so a
    corrupt, missing or truncated file is one clear error here, never a traceback or fewer documents later."""

    def __init__(self, data_dir: str):
        self.manifest = _read_manifest(data_dir)
        shards = self.manifest["shards"]
        zero = np.zeros(1, np.int64)
        self.first_doc = np.concatenate([zero, np.cumsum([sh["n_docs"] for sh in shards])]).astype(np.int64)
        self.first_token = np.concatenate([zero, np.cumsum([sh["n_tokens"] for sh in shards])]).astype(np.int64)
        kind = np.int64 if max(sh["n_tokens"] for sh in shards) >= 2 ** 32 else np.uint32
        self.tokens: list[np.ndarray] = []
        lengths = []  # per shard, then one array: nothing is sized from the manifest's word alone
        for sh in shards:
            tokens, offs = _open_shard(data_dir, sh)
            self.tokens.append(tokens)
            lengths.append(np.diff(offs).astype(kind))
            del offs
        self.doc_lengths = np.concatenate(lengths)
        del lengths
        sums = np.concatenate([_block_sums(self.doc_lengths[a:a + _CHUNK])
                               for a in range(0, len(self.doc_lengths), _CHUNK)] or [zero[:0]])
        self.block_first_token = np.concatenate([zero, np.cumsum(sums)])  # corpus position of doc b * STARTS_EVERY
        self.n_tokens = int(self.first_token[-1])
        self._first_doc = self.first_doc.tolist()  # one int per shard, for a quick bisect
        self.instructions: list[tuple[list[int], list[int]]] = []
        if self.manifest.get("instructions"):
            self.instructions = _read_instructions_file(inside(data_dir, self.manifest["instructions"],
                                                               os.path.join(data_dir, MANIFEST)))

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def view(self, k: int) -> np.ndarray:
        """Document k's ids as stored (uint32, a view of the memory map: nothing copied)."""
        n = len(self)
        if not -n <= k < n:
            raise IndexError(f"document {k} of {n}")
        k %= n
        s = bisect.bisect_right(self._first_doc, k) - 1
        b = k // STARTS_EVERY
        start = int(self.block_first_token[b]) + int(self.doc_lengths[b * STARTS_EVERY:k].sum(dtype=np.int64))
        start -= int(self.first_token[s])
        return self.tokens[s][start:start + int(self.doc_lengths[k])]

    def document(self, k: int) -> np.ndarray:
        """Document k's ids (int64, a copy)."""
        return np.asarray(self.view(k), np.int64)

    def lengths(self, docs: np.ndarray) -> np.ndarray:
        """Token counts (int64) of the documents numbered `docs`."""
        return self.doc_lengths[docs].astype(np.int64)

    def ids(self) -> Ids:
        s = self.manifest["special_ids"]
        return Ids(mask=s["MASK"], gmask=s["gMASK"], smask=s["sMASK"], sop=s["sop"], eop=s["eop"],
                   pad=self.manifest["pad_id"], sentence_ends=tuple(self.manifest["sentence_ends"]))


@dataclasses.dataclass(frozen=True)
class EpochOrder:
    """One epoch's shuffled document order and where its documents start in the token stream.

    `order` is the permutation (uint32 below 2**32 documents: 4 bytes per document); `block_starts[b]`
    is the stream position (documents + one separator each) of document order[b * STARTS_EVERY],
    the last entry the epoch's length: int64, 1/8 byte per document. A position's document is found
    by a search in block_starts and a cumulative sum over one block."""

    epoch: int
    order: np.ndarray
    block_starts: np.ndarray

    @staticmethod
    def build(shards: TokenShards, seed: int, epoch: int) -> EpochOrder:
        """The order of `rng([seed, 1, epoch]).permutation(n)`, shuffled in place in its final dtype."""
        n = len(shards)
        order = np.arange(n, dtype=np.uint32 if n < 2 ** 32 else np.int64)
        np.random.default_rng([seed, 1, epoch]).shuffle(order)  # the same draws as permutation(n)
        sums = np.concatenate([_block_sums(shards.doc_lengths[order[a:a + _CHUNK]], 1)  # + the separator
                               for a in range(0, n, _CHUNK)] or [np.zeros(0, np.int64)])
        return EpochOrder(epoch, order, np.concatenate([np.zeros(1, np.int64), np.cumsum(sums)]))

    def locate(self, shards: TokenShards, position: int) -> tuple[int, int]:
        """(index into the order, offset inside that document) of stream position `position`."""
        b = int(np.searchsorted(self.block_starts, position, side="right")) - 1
        lens = shards.lengths(self.order[b * STARTS_EVERY:(b + 1) * STARTS_EVERY]) + 1
        starts = int(self.block_starts[b]) + np.concatenate([np.zeros(1, np.int64), np.cumsum(lens)])
        j = int(np.searchsorted(starts, position, side="right")) - 1
        return b * STARTS_EVERY + j, position - int(starts[j])


class _Documents(Sequence):
    """Documents in one epoch's shuffled order (views of the memory maps)."""

    def __init__(self, shards: TokenShards, order: np.ndarray):
        self.shards, self.order = shards, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k):  # type: ignore[override]
        return self.shards.view(int(self.order[k]))


class GLMLoader:
    """Deterministic, resumable, host-sliced GLM batches from a prepared corpus.

    Safe to use from two threads (a Prefetcher and its owner): its only shared state is the epoch
    order, built under a lock and replaced whole."""

    def __init__(self, shards: TokenShards, cfg: ObjectiveConfig, global_batch: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, model_vocab: int | None = None):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise InputError(f"process {process_index} of {process_count} does not exist")
        if global_batch < 1:
            raise InputError(f"global batch must be >= 1, got {global_batch}")
        if global_batch % process_count:
            raise InputError(f"global batch {global_batch} is not divisible by {process_count} processes")
        if model_vocab is not None and shards.manifest["vocab_size"] > model_vocab:
            raise InputError(f"the corpus tokenizer has {shards.manifest['vocab_size']} ids, the model's "
                             f"vocabulary only {model_vocab}")
        self.shards, self.cfg, self.seed = shards, cfg, seed
        self.global_batch, self.process_index, self.process_count = global_batch, process_index, process_count
        self.ids = shards.ids()
        self.eos = shards.manifest["eos_id"]
        self.next_sequence = 0
        self.epoch_tokens = shards.n_tokens + len(shards)  # every document + its separator
        self.chunks_per_epoch = max(1, self.epoch_tokens // cfg.seq_length)
        self._epoch: EpochOrder | None = None
        self._epoch_lock = threading.Lock()

    def epoch_order(self, epoch: int) -> EpochOrder:
        """Epoch `epoch`'s order (the last one built is kept)."""
        with self._epoch_lock:
            if self._epoch is None or self._epoch.epoch != epoch:
                self._epoch = None  # free the old order before building the new one
                self._epoch = EpochOrder.build(self.shards, self.seed, epoch)
            return self._epoch

    def _stream_at(self, index: int) -> TokenStream:
        """A stream positioned at chunk `index` of its epoch's shuffled document order."""
        epoch, chunk = divmod(index, self.chunks_per_epoch)
        order = self.epoch_order(epoch)
        doc, offset = order.locate(self.shards, chunk * self.cfg.seq_length)
        return TokenStream(_Documents(self.shards, order.order), self.eos, doc, offset)

    def sequence(self, index: int) -> tuple[dict[str, np.ndarray], list[Sample]]:
        """Global sequence number `index`, identical on every host."""
        rng = np.random.default_rng([self.seed, 0, index])
        cursor = [index * self.cfg.windows_per_sequence]
        return make_sequence(self._stream_at(index), self.cfg, self.ids, rng, self.shards.instructions, cursor)

    def rows_at(self, position: int) -> range:
        """The global sequence numbers this process builds for the batch starting at `position`:
        [position + h * B/H, position + (h + 1) * B/H) for process h of H, global batch B."""
        per = self.global_batch // self.process_count
        first = position + self.process_index * per
        return range(first, first + per)

    def batch_at(self, position: int) -> dict[str, np.ndarray]:
        """This process's rows (`rows_at(position)`) of the global batch starting at `position`."""
        if position < 0:
            raise InputError(f"data position must be >= 0, got {position}")
        rows = [self.sequence(i)[0] for i in self.rows_at(position)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def next_batch(self) -> dict[str, np.ndarray]:
        """This host's rows of the next global batch."""
        batch = self.batch_at(self.next_sequence)
        self.next_sequence += self.global_batch
        return batch

    def state(self) -> dict[str, int]:
        return {"next_sequence": self.next_sequence, "seed": self.seed}

    def restore(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise InputError(f"data state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.next_sequence = int(state["next_sequence"])


class Prefetcher:
    """`loader.batch_at(p)`, `batch_at(p + stride)`, ... built by a daemon thread, up to `depth` ahead.

    `get(position)` returns exactly `loader.batch_at(position)`; asked for any other position than the
    one after the last (a resume, a rollback), it restarts the stream there. An error the thread hits
    is raised by `get` as itself. Numpy and Python work on the host thus overlaps a step's device work
    (which releases the GIL). `close()` (or leaving a `with` block) stops the thread."""

    def __init__(self, loader: GLMLoader, stride: int, depth: int = 2):
        if stride < 1 or depth < 1:
            raise InputError(f"prefetch stride and depth must be >= 1, got {stride} and {depth}")
        self.loader, self.stride, self.depth = loader, stride, depth
        self.wait_seconds = 0.0  # time get() spent waiting for the thread
        self.restarts = 0  # streams started (the first one included)
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[tuple[int, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._next: int | None = None
        self._closed = False

    def get(self, position: int) -> dict[str, np.ndarray]:
        """This process's rows of the batch at `position` (see GLMLoader.batch_at)."""
        if self._closed:
            raise RuntimeError("the prefetcher is closed")
        if position != self._next or self._thread is None:
            self._start(position)
        t0 = time.perf_counter()
        got, item = self._take()
        self.wait_seconds += time.perf_counter() - t0
        if isinstance(item, BaseException):
            self._halt()  # the stream ends with its error; the next get starts a new one
            raise item
        if got != position:
            raise RuntimeError(f"prefetcher out of step: wanted position {position}, the thread made {got}")
        self._next = position + self.stride
        return item

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is making) and drop what it made."""
        self._halt()
        self._closed = True

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, position: int) -> None:
        """A fresh stream (thread and queue) from `position`; the old one is stopped first."""
        self._halt()
        self._queue, self._stop = queue.Queue(self.depth), threading.Event()
        weakref.finalize(self, self._stop.set)  # a prefetcher dropped unclosed still stops its thread
        self._thread = threading.Thread(target=_produce, name=f"glmjax-prefetch@{position}", daemon=True,
                                        args=(self.loader, position, self.stride, self._queue, self._stop))
        self._thread.start()
        self._next, self.restarts = position, self.restarts + 1

    def _halt(self) -> None:
        """Stop the current stream's thread and wait for it (it ends within one batch)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread, self._next = None, None

    def _take(self) -> tuple[int, Any]:
        """The thread's next (position, batch or error), waiting for it."""
        assert self._thread is not None
        while True:
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread ended without a batch") from None


def _produce(loader: GLMLoader, position: int, stride: int, out: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: batches from `position` on into `out` until stopped or an error."""
    while not stop.is_set():
        try:
            item: Any = loader.batch_at(position)
        except Exception as e:  # handed to get(), which raises it in the caller's thread
            item = e
        while not stop.is_set():
            try:
                out.put((position, item), timeout=0.05)
                break
            except queue.Full:
                continue
        if isinstance(item, Exception):
            return
        position += stride


def objective_statistics(samples: Sequence[Sample], sequences: int) -> dict[str, float]:
    """What the objective actually did: shares of sequence kinds, masked ratio, span lengths."""
    kinds: dict[str, int] = {}
    for s in samples:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    masks = [s for s in samples if s.kind in ("mask", "smask")]
    gm = [s for s in samples if s.kind == "gmask"]
    spans = [n for s in masks for n in s.spans]
    return {"sequences": sequences, "gmask_sequences": len(gm),
            "mask_samples": kinds.get("mask", 0), "smask_samples": kinds.get("smask", 0),
            "instruction_samples": kinds.get("instruction", 0),
            "mask_ratio": sum(s.masked for s in masks) / max(1, sum(s.text for s in masks)),
            "mean_span_length": float(np.mean(spans)) if spans else 0.0,
            "gmask_masked_fraction": float(np.mean([s.masked / s.text for s in gm])) if gm else 0.0}


def global_batch_on_mesh(local: dict[str, np.ndarray], mesh: Any) -> dict[str, Any]:
    """This host's rows as global jax.Arrays sharded over data+fsdp on the mesh."""
    import jax

    from glmjax.parallel import rules

    out = {}
    for k, v in local.items():
        axes = ("batch",) + (None,) * (v.ndim - 1)
        out[k] = jax.make_array_from_process_local_data(rules.named(mesh, *axes), v)
    return out
