"""The llama.cpp context behind the engine: one KV sequence per slot, one decode step for all.

Each slot owns a KV sequence in its own stream (`kv_unified = false`), so a sequence's cells sit
at the same places whether it runs alone or beside others. llama.cpp decodes streams together
only when their sequence ids are consecutive, so the engine keeps its running slots at the
lowest ids (`swap`). Everything here runs on the inference thread only.

Batch invariance (greedy output that does not depend on what else is in the batch) comes from
which kernel computes each row. With flash attention and repacked weights off, every kernel
gives a row the same result whatever other rows share its call, with one exception: llama.cpp's
tiled K-quant matmul takes over from TILED_MIN_ROWS rows up and rounds differently from the
row-by-row kernel below that. The default turns it off (GGML_CPU_TILED_MM=0): one kernel, one
call per step. With GGML_CPU_TILED_MM=1 set for the daemon, a step is split into calls by the
rows' roles instead (`steps`): the model's words (decoded tokens; a prompt's last token, after
which the model answers; and an assistant turn's text, with the token before it, when a prompt
brings it back) in calls of fewer rows, row by row, together; all other prompt tokens in calls
of at least TILED_MIN_ROWS rows, tiled (padded with throwaway rows when fewer). A prompt cached
but for its last token thus rides along with the decoding streams' call. Either way a token's
cells are the same however the prompt was chunked, whatever decoded beside it, and whether
they were cached or computed again (tests/test_batch_invariance.py).
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# Sampling defaults shared with llama-cpp-python's chat completion, so that a request and the
# same request through raw llama-cpp-python sample the same way.
TOP_K, TOP_P, MIN_P = 40, 0.95, 0.05
# ggml's tiled K-quant matmul (x86) computes a matmul from this many rows up
# (ggml_tiled_min_batch in ggml-cpu/tiled/tiled.cpp); tests/test_batch_invariance.py fails if
# a llama.cpp upgrade moves it.
TILED_MIN_ROWS = 8
TILED_ENV = "GGML_CPU_TILED_MM"
# llama_token_data as numpy lays it out (id, logit, p: 12 bytes), for candidate arrays.
TOKEN_DATA = [("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]
# (slot, tokens, want_logits): one sequence's part of a llama_decode call
Feed = tuple["Slot", list[int], bool]


def _env_int(name: str, default: int) -> int:
    """The variable as C's atoi reads it (ggml does): leading digits, else 0."""
    value = os.environ.get(name)
    if value is None:
        return default
    digits = re.match(r"\s*[+-]?\d+", value)
    return int(digits.group()) if digits else 0


def kernel_tag(batch_invariant: bool, system_info: str) -> str:
    """Which matmul kernels compute a context's rows, also for saved cells that must match
    freshly computed ones (prefix snapshots):
    - "" with llama.cpp's own choices (batch_invariant off; flash attention and repacked
      weights are recorded apart);
    - "rowwise" where the tiled K-quant matmul is off (GGML_CPU_TILED_MM=0) or not built (it
      needs AVX on x86): every row row by row, one call per step is invariant;
    - "tiled" with GGML_CPU_TILED_MM_FORCE=1: every row tiled, one call per step too (decoding
      is slower);
    - "roles<N>": prompt text tiled in calls of at least N rows, the model's words row by row.
    """
    if not batch_invariant:
        return ""
    if _env_int(TILED_ENV, 1) == 0 or not re.search(r"\bAVX\w* = 1", system_info):
        return "rowwise"
    if _env_int(f"{TILED_ENV}_FORCE", 0) == 1:
        return "tiled"
    return f"roles{TILED_MIN_ROWS}"


def tokens_inside(pieces: Sequence[bytes], size: int,
                  spans: Sequence[tuple[int, int]]) -> list[bool]:  # fmt: skip
    """For each token (its bytes in `pieces`, which spell a text of `size` bytes), whether it
    lies wholly in one of the byte `spans` (sorted), or is the token that ends where a span
    starts (the one the model answered after: it was read with the model's words, as the
    last token of the prompt that asked); all False when the pieces do not spell the text (a
    first piece the text does not show, a BOS, is skipped)."""
    lengths = [len(p) for p in pieces]
    if lengths and sum(lengths) == size + lengths[0]:
        lengths[0] = 0
    starts = {start for start, _end in spans}
    out, offset, i = [], 0, 0
    for length in lengths:
        end = offset + length
        while i < len(spans) and spans[i][1] <= offset:
            i += 1
        inside = i < len(spans) and spans[i][0] <= offset and end <= spans[i][1]
        out.append(inside or (length > 0 and end in starts))
        offset = end
    return out if offset == size else [False] * len(pieces)


def pack(feeds: Sequence[Feed], limit: int) -> list[list[Feed]]:
    """The feeds (in order) in as few calls of at most `limit` rows as they fit, the rows
    spread evenly over the calls (8 streams in calls of 7: 4 and 4, not 7 and 1)."""
    total = sum(len(tokens) for _slot, tokens, _want in feeds)
    if not total:
        return []
    target = -(-total // -(-total // limit))
    calls: list[list[Feed]] = [[]]
    rows = 0
    for feed in feeds:
        size = len(feed[1])
        if calls[-1] and (rows + size > limit or rows >= target):
            calls.append([])
            rows = 0
        calls[-1].append(feed)
        rows += size
    return calls


# Parsed grammars kept per decoder, by the GBNF's sha256 (a line sends the same schema each time).
GRAMMAR_CACHE = 32
# A rejected token is sampled again among the tokens whose logits are at least the
# RESAMPLE_TOP-th largest (all of them, ties included) when enough of those are allowed: the
# same token as over the whole vocabulary, for a fraction of the grammar's work.
RESAMPLE_TOP = 2048


class GrammarError(ValueError):
    """llama.cpp could not parse a grammar (its reason goes to stderr only)."""


class DecodeError(RuntimeError):
    """llama_decode failed for a call; the slots in it are left as they were before it."""

    def __init__(self, message: str, slots: Sequence[Slot] = ()) -> None:
        super().__init__(message)
        self.slots = list(slots)


@dataclass
class Slot:
    """One KV sequence: what its cells hold, what it still has to read, how it samples."""

    seq: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV is in the sequence
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet evaluated
    written: list[bool] = field(default_factory=list)  # per pending token: the model's words
    sampler: Any = None
    grammar: Any = None  # this slot's own grammar sampler (a clone), None when unconstrained
    greedy: bool = True  # its chain takes the largest logit (temperature 0)
    logits_at: int = -1  # index in the last batch of this slot's output row, -1: none
    owner: str = ""  # the client whose prompt the cells hold (see kvreuse.KvReuse.fill)

    @property
    def ready_to_sample(self) -> bool:
        return self.logits_at >= 0 and not self.pending


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def starts_with(held: Sequence[int], tokens: Sequence[int]) -> bool:
    """`held` begins with all of `tokens` (cells for `held` hold those for `tokens`)."""
    return len(held) >= len(tokens) and common_prefix(held, tokens) == len(tokens)


class BatchDecoder:
    """Owns the model and a context with `n_slots` sequences of `n_ctx` cells each."""

    def __init__(self, model_file: Path, *, n_ctx: int, n_slots: int, n_batch: int,
                 n_threads: int, batch_invariant: bool = True) -> None:  # fmt: skip
        import llama_cpp  # noqa: PLC0415 (heavy import, only where the model lives)
        from llama_cpp._internals import LlamaModel  # noqa: PLC0415
        from llama_cpp._logger import set_verbose  # noqa: PLC0415

        set_verbose(False)  # llama.cpp's own log: errors only (its info lines flood the journal)

        self._lib = llama_cpp
        self.batch_invariant = batch_invariant
        if batch_invariant:
            # By default the row-by-row matmul for every row, in one call per step. With
            # GGML_CPU_TILED_MM=1 in the environment, prompt text goes through the tiled
            # kernel and steps are split by role (see above): a long prompt reads faster, but
            # a step that reads prompt text beside decoding streams takes one more
            # llama_decode, and 8 or more streams take two calls a step (docs/benchmarks.md).
            os.environ.setdefault(TILED_ENV, "0")  # read once, at the process's first matmul
        info = llama_cpp.llama_print_system_info()
        self.kernels = kernel_tag(
            batch_invariant, info.decode() if isinstance(info, bytes) else info
        )
        # Calls split by the rows' roles only where the two matmul kernels meet.
        self.split_roles = self.kernels.startswith("roles")
        mparams = llama_cpp.llama_model_default_params()
        # Repacked weights switch between a one-column and a many-column kernel with the batch
        # size, whose sums round differently: off, every token's logits are the same whatever
        # else is in the batch (with llama.cpp built without its llamafile GEMM, which does
        # the same; see scripts/build-llama.sh).
        mparams.use_extra_bufts = not batch_invariant
        self.model = LlamaModel(path_model=str(model_file), params=mparams, verbose=False)
        self.vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab()
        self.n_ctx, self.n_batch = n_ctx, n_batch
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * n_slots
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_slots
        cparams.kv_unified = False
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        # Flash attention reads prompts about 15% faster here, but its sums over a long
        # context round differently with the number of tokens in the step.
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            if batch_invariant
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        )
        ctx = llama_cpp.llama_init_from_model(self.model.model, cparams)
        if ctx is None:
            raise RuntimeError(f"llama.cpp could not create a context for {n_slots} x {n_ctx}")
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(ctx))
        self.slots = [Slot(seq=i) for i in range(n_slots)]
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._pieces: dict[int, bytes] = {}
        self._special_pieces: dict[int, bytes] = {}
        self._grammars: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.grammar_stats = {"compiled": 0, "reused": 0, "checked": 0, "resampled": 0,
                              "resampled_whole": 0}  # fmt: skip
        self._control: Optional[frozenset[int]] = None  # see control_tokens
        # One candidate, to ask a slot's grammar about the token its chain chose.
        self._one = llama_cpp.llama_token_data()
        self._one_arr = llama_cpp.llama_token_data_array(
            data=ctypes.pointer(self._one), size=1, selected=-1, sorted=False
        )

    def close(self) -> None:
        if self.ctx is not None:
            for slot in self.slots:
                self.set_sampler(slot, None)
            for template in self._grammars.values():
                self._lib.llama_sampler_free(template)
            self._grammars.clear()
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self.ctx)
            self.ctx = None
        self.model.close()  # type: ignore[no-untyped-call]

    # --- tokens ---------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool, add_bos: bool = False) -> list[int]:
        tokens: list[int] = self.model.tokenize(text.encode("utf-8"), add_bos, special)
        return tokens

    def piece(self, token: int, special: bool = False) -> bytes:
        """The token's text bytes; control tokens give none, or with `special` their text as
        a template writes it."""
        cache = self._special_pieces if special else self._pieces
        found = cache.get(token)
        if found is None:
            size = 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = self._lib.llama_token_to_piece(self.vocab, token, buf, size, 0, special)
                if n >= 0:
                    found = buf.raw[:n]
                    break
                size = -n
            cache[token] = found
        return found

    def inside(self, tokens: Sequence[int], text: bytes,
               spans: Sequence[tuple[int, int]]) -> list[bool]:  # fmt: skip
        """For each of `tokens` (the tokenization of `text`), whether it lies in `spans`."""
        return tokens_inside([self.piece(t, special=True) for t in tokens], len(text), spans)

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def control_tokens(self) -> frozenset[int]:
        """Control tokens that do not end generation (<|im_start|>, <|fim_prefix|>, ...).
        llama.cpp's grammar reads them by their special text, so a string rule takes them,
        while the answer's text has none of it: under a grammar they are never drawn.
        Found once, on the first constrained request (a pass over the vocabulary)."""
        if self._control is None:
            lib, vocab = self._lib, self.vocab
            self._control = frozenset(
                t for t in range(self.n_vocab)
                if lib.llama_vocab_is_control(vocab, t) and not lib.llama_vocab_is_eog(vocab, t)
            )  # fmt: skip
        return self._control

    # --- sampling -------------------------------------------------------------------------

    def compile_grammar(self, gbnf: str) -> Any:
        """llama.cpp's parsed grammar for a GBNF text (root rule `root`), kept by its hash;
        raises GrammarError if llama.cpp cannot parse it."""
        key = hashlib.sha256(gbnf.encode()).hexdigest()
        found = self._grammars.get(key)
        if found is not None:
            self._grammars.move_to_end(key)
            self.grammar_stats["reused"] += 1
            return found
        found = self._lib.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        if not found:
            raise GrammarError("llama.cpp cannot parse this grammar")
        self.grammar_stats["compiled"] += 1
        self._grammars[key] = found
        while len(self._grammars) > GRAMMAR_CACHE:
            self._lib.llama_sampler_free(self._grammars.popitem(last=False)[1])
        return found

    def set_sampler(
        self,
        slot: Slot,
        temperature: Optional[float],
        seed: int = 0,
        top_p: Optional[float] = None,
        grammar: Any = None,
    ) -> None:
        """Greedy for temperature 0, else top-k, top-p (TOP_P unless given), min-p,
        temperature, random draw; with `grammar` (GBNF, or compile_grammar's result), only
        tokens it allows (see `sample`). None frees the slot's samplers."""
        lib = self._lib
        if slot.sampler is not None:
            lib.llama_sampler_free(slot.sampler)
            slot.sampler = None
        if slot.grammar is not None:
            lib.llama_sampler_free(slot.grammar)
            slot.grammar = None
        if temperature is None:
            return
        if grammar is not None:
            # A GBNF text, or what compile_grammar made of one (the engine parses it first).
            template = self.compile_grammar(grammar) if isinstance(grammar, str) else grammar
            slot.grammar = lib.llama_sampler_clone(template)
        slot.greedy = temperature <= 0
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(TOP_K))
            lib.llama_sampler_chain_add(
                chain, lib.llama_sampler_init_top_p(TOP_P if top_p is None else top_p, 1)
            )
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(MIN_P, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(temperature))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        slot.sampler = chain

    def sample(self, slot: Slot) -> int:
        """Draw the next token from the logits the last step left for this slot.

        With a grammar, the way llama.cpp's own common sampler does it: the chain draws as if
        unconstrained, the grammar is asked about that one token, and only when it refuses
        is the draw made again among the tokens it allows. Greedy, that is the allowed token
        with the highest logit either way. The grammar then accepts the token: it is never
        given one it refuses (llama.cpp aborts on that).
        """
        lib = self._lib
        token = int(lib.llama_sampler_sample(slot.sampler, self.ctx, slot.logits_at))
        if slot.grammar is None:
            return token
        self.grammar_stats["checked"] += 1
        if token in self.control_tokens() or not self._allows(slot, token):
            token = self._resample(slot)
        lib.llama_sampler_accept(slot.grammar, token)
        return token

    def _allows(self, slot: Slot, token: int) -> bool:
        """Whether the slot's grammar takes `token` next (asked about that token alone)."""
        one: Any = self._one
        one.id, one.logit, one.p = token, 1.0, 0.0
        self._one_arr.size, self._one_arr.selected, self._one_arr.sorted = 1, -1, False
        self._lib.llama_sampler_apply(slot.grammar, ctypes.byref(self._one_arr))
        return bool(one.logit != -math.inf)

    def grammar_complete(self, slot: Slot) -> bool:
        """Whether the slot's grammar would let the answer end here (no grammar: True)."""
        if slot.grammar is None:
            return True
        end = int(self._lib.llama_vocab_eos(self.vocab))
        if end < 0:  # a vocabulary without EOS ends with EOT
            end = int(self._lib.llama_vocab_eot(self.vocab))
        return end < 0 or self._allows(slot, end)

    def _resample(self, slot: Slot) -> int:
        """The draw again, among the tokens the slot's grammar allows: first among those with
        the largest logits (enough of them allowed gives the same draw as the whole
        vocabulary), else over the whole vocabulary."""
        import numpy as np  # noqa: PLC0415

        lib = self._lib
        self.grammar_stats["resampled"] += 1
        ptr = lib.llama_get_logits_ith(self.ctx, slot.logits_at)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        logits = logits.copy()  # llama.cpp's own buffer stays as the step left it
        logits[sorted(self.control_tokens())] = -np.inf
        top = min(RESAMPLE_TOP, self.n_vocab)
        cut = np.partition(logits, self.n_vocab - top)[self.n_vocab - top]
        need = 1 if slot.greedy else TOP_K
        for ids in (np.flatnonzero(logits >= cut), np.arange(self.n_vocab)):
            whole = len(ids) == self.n_vocab
            cand = np.zeros(len(ids), dtype=TOKEN_DATA)
            cand["id"], cand["logit"] = ids, logits[ids]
            arr = lib.llama_token_data_array(
                data=cand.ctypes.data_as(lib.llama_token_data_p), size=len(cand), selected=-1,
                sorted=False,
            )  # fmt: skip
            lib.llama_sampler_apply(slot.grammar, ctypes.byref(arr))
            allowed = int(np.count_nonzero(cand["logit"] != -np.inf))
            if allowed >= need or whole:
                if not allowed:
                    raise DecodeError("the grammar allows no token here", [slot])
                self.grammar_stats["resampled_whole"] += whole
                lib.llama_sampler_apply(slot.sampler, ctypes.byref(arr))
                return int(arr.data[arr.selected].id)
        raise AssertionError("unreachable: the whole vocabulary is the last try")

    def logprob(self, slot: Slot, token: int) -> float:
        """log p(token) under the model's raw distribution at the slot's last output row."""
        import numpy as np  # noqa: PLC0415

        ptr = self._lib.llama_get_logits_ith(self.ctx, slot.logits_at)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        top = float(logits.max())
        return float(logits[token]) - top - float(np.log(np.exp(logits - top).sum()))

    # --- KV cache -------------------------------------------------------------------------

    def reuse(self, slot: Slot, prompt: list[int], limit: Optional[int] = None,
              written: Optional[Sequence[bool]] = None) -> int:  # fmt: skip
        """Keep the slot's cells that match the prompt's start (at most `limit`), queue the
        rest (with `written`: which prompt tokens are the model's own words); return how many
        were kept.

        At least one prompt token is always evaluated, so that the step leaves logits.
        """
        keep = min(common_prefix(slot.cached, prompt), len(prompt) - 1)
        if limit is not None:
            keep = min(keep, limit)
        self.truncate(slot, keep)
        slot.pending = list(prompt[keep:])
        slot.written = list(written[keep:]) if written else [False] * len(slot.pending)
        return keep

    def truncate(self, slot: Slot, keep: int) -> None:
        if keep < len(slot.cached):
            if not self._lib.llama_memory_seq_rm(self.memory, slot.seq, keep, -1):
                self._lib.llama_memory_seq_rm(self.memory, slot.seq, 0, -1)
                keep = 0
            del slot.cached[keep:]
        slot.logits_at = -1

    def clear(self, slot: Slot) -> None:
        self.truncate(slot, 0)
        slot.pending = []
        slot.written = []

    def save(self, slot: Slot) -> bytes:
        """The slot's KV cells as bytes (for a session or a shared prefix)."""
        lib = self._lib
        size = lib.llama_state_seq_get_size(self.ctx, slot.seq)
        buf = (ctypes.c_uint8 * size)()
        n = lib.llama_state_seq_get_data(self.ctx, buf, size, slot.seq)
        # string_at copies the bytes once; slicing a ctypes array would build a list of n ints
        # (8 bytes each), a transient many times the state's size on every saved turn.
        return ctypes.string_at(buf, n)

    def load(self, slot: Slot, tokens: list[int], state: bytes) -> bool:
        """Replace the slot's cells with saved ones; False (and an empty slot) if refused."""
        lib = self._lib
        self.clear(slot)
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if lib.llama_state_seq_set_data(self.ctx, buf, len(state), slot.seq) != len(state):
            self.clear(slot)
            return False
        slot.cached = list(tokens)
        return True

    def swap(self, a: Slot, b: Slot) -> None:
        """Exchange two slots' cells, tokens, pending prompt, samplers and owner."""
        state_a = self.save(a) if a.cached else b""
        state_b = self.save(b) if b.cached else b""
        tokens_a, tokens_b = list(a.cached), list(b.cached)
        rest_a = (a.pending, a.written, a.sampler, a.grammar, a.greedy, a.logits_at, a.owner)
        rest_b = (b.pending, b.written, b.sampler, b.grammar, b.greedy, b.logits_at, b.owner)
        self.truncate(a, 0)
        self.truncate(b, 0)
        if state_b and not self.load(a, tokens_b, state_b):
            raise DecodeError(f"could not move sequence {b.seq} to {a.seq}")
        if state_a and not self.load(b, tokens_a, state_a):
            raise DecodeError(f"could not move sequence {a.seq} to {b.seq}")
        a.pending, a.written, a.sampler, a.grammar, a.greedy, a.logits_at, a.owner = rest_b
        b.pending, b.written, b.sampler, b.grammar, b.greedy, b.logits_at, b.owner = rest_a

    # --- one step -------------------------------------------------------------------------

    def steps(self, decoding: Sequence[tuple[Slot, int]],
              reading: Sequence[tuple[Slot, int, bool]]) -> Iterator[list[Slot]]:  # fmt: skip
        """One engine step: a token for each decoding (slot, token), and the next `n` pending
        prompt tokens of each reading (slot, n, want_logits), removed from `pending`.

        Runs as many llama_decode calls as batch invariance needs (one without it) and yields,
        after each, the slots that now have logits: sample them before resuming, as the next
        call replaces them. A failed call raises DecodeError naming its slots; the calls
        before it stand.
        """
        # Consecutive sequence ids: llama.cpp computes such streams in one pass.
        decodes: list[Feed] = sorted(((slot, [token], True) for slot, token in decoding),
                                     key=lambda f: f[0].seq)  # fmt: skip
        if not self.split_roles:
            feeds = decodes + [(s, s.pending[:n], want) for s, n, want in reading]
            self.step(feeds)
            for slot, n, _want in reading:
                del slot.pending[:n], slot.written[:n]
            yield [f[0] for f in feeds if f[0].logits_at >= 0]
            return
        group = TILED_MIN_ROWS - 1
        # Rows for the row-by-row kernel: the decoding streams, and each reading's last run of
        # the model's own words (the token before an answer: a prompt's last one), which
        # thus rides along with them instead of taking a call of its own.
        rowwise: list[Feed] = list(decodes)
        tails: set[int] = set()  # sequences whose rows in `rowwise` are pending prompt tokens
        for slot, count, want in reading:
            slot.written += [False] * (len(slot.pending) - len(slot.written))
            n = count
            while n > 0:
                written = slot.written[0]
                run = 1
                while run < n and slot.written[run] == written:
                    run += 1
                if written and run == n <= group:
                    rowwise.append((slot, slot.pending[:run], want))
                    tails.add(slot.seq)
                    break
                take = min(run, group) if written else run
                last = take == n
                tokens = slot.pending[:take]
                self.step([(slot, tokens, want and last)], 0 if written else TILED_MIN_ROWS)
                del slot.pending[:take], slot.written[:take]
                n -= take
                yield [slot] if want and last else []
        for part in pack(rowwise, group):
            self.step(part)
            for slot, tokens, _want in part:
                if slot.seq in tails:
                    del slot.pending[: len(tokens)], slot.written[: len(tokens)]
            yield [f[0] for f in part if f[2]]

    def step(self, feeds: list[Feed], min_rows: int = 0) -> None:
        """Evaluate `tokens` for each (slot, tokens, want_logits) in one llama_decode call.

        The caller keeps the total within n_batch. A slot asking for logits gets them for its
        last token in `logits_at` (every other slot's are gone). With `min_rows`, a call with
        one sequence and fewer rows gets throwaway rows after its tokens, removed again, so
        that its tokens take the kernels of a call that size (when the sequence has room).
        """
        feeds = sorted(feeds, key=lambda f: f[0].seq)  # consecutive streams decode together
        b = self._batch
        n = 0
        for slot, tokens, want_logits in feeds:
            pos = len(slot.cached)
            for j, token in enumerate(tokens):
                b.token[n] = token
                b.pos[n] = pos + j
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = slot.seq
                b.logits[n] = 0
                n += 1
            if want_logits:
                b.logits[n - 1] = 1
        real = n
        if len(feeds) == 1 and n < min_rows:
            slot, tokens, _want = feeds[0]
            end = len(slot.cached) + len(tokens)
            if end + min_rows - n <= self.n_ctx_seq:
                for j in range(min_rows - n):
                    b.token[n] = tokens[-1]
                    b.pos[n] = end + j
                    b.n_seq_id[n] = 1
                    b.seq_id[n][0] = slot.seq
                    b.logits[n] = 0
                    n += 1
        b.n_tokens = n
        for slot in self.slots:
            slot.logits_at = -1
        rc = self._lib.llama_decode(self.ctx, b)
        lost = []
        if rc != 0 or n > real:
            # Cells beyond each slot's `cached` (the padding, or what a failed call wrote)
            # are removed; a sequence that refuses is emptied (and the call fails for it).
            for slot, tokens, _want in feeds:
                keep = len(slot.cached) + (len(tokens) if rc == 0 else 0)
                if not self._lib.llama_memory_seq_rm(self.memory, slot.seq, keep, -1):
                    self._lib.llama_memory_seq_rm(self.memory, slot.seq, 0, -1)
                    slot.cached.clear()
                    lost.append(slot)
        if rc != 0 or lost:
            raise DecodeError(
                f"llama_decode returned {rc} for {real} tokens"
                if rc != 0
                else "llama.cpp could not remove the padding rows",
                [f[0] for f in feeds] if rc != 0 else lost,
            )
        n = 0
        for slot, tokens, want_logits in feeds:
            slot.cached.extend(tokens)
            n += len(tokens)
            slot.logits_at = n - 1 if want_logits else -1
