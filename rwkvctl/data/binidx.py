"""Megatron MMIDIDX `.bin/.idx` token files, the format RWKV-LM's trainer reads unchanged.

`.idx` layout (little-endian): magic `MMIDIDX\\0\\0` (9 B), `<Q` version 1, `<B` dtype code, `<Q` sequence
count S, `<Q` doc_idx count D, then int32 sizes[S], int64 pointers[S] (byte offsets into .bin),
int64 doc_idx[D]. Header = 34 bytes. `.bin` is the raw concatenation of every sequence, no header.
RWKV-LM treats `.bin` as one flat token stream, so `tokens()` is what a trainer samples windows from.

Also here: `magic_prime`, the chunk-count prime RWKV-LM's sampler needs (`--magic_prime`).
"""

from __future__ import annotations

import contextlib
import struct
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

import numpy as np

from rwkvctl.errors import DataError
from rwkvctl.fs import AtomicFiles

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, doc_idx count
HEADER_SIZE = HEADER.size  # 34

# Codes 1-5 and 8 agree across Megatron, json2binidx and RWKV-LM; 6/7 disagree between tools, and RWKV-LM
# maps both to float64. Only 4 (int32) and 8 (uint16) matter for token ids.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float64),
    8: np.dtype(np.uint16),
}
WRITE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id (0..vocab_size-1) fits, else int32. World (65536 ids) fits uint16."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def split_prefix(path: str | Path) -> Path:
    """`data/x`, `data/x.bin` and `data/x.idx` all name the prefix `data/x`."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".bin", ".idx") else p


def _memmap(path: Path, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
    if count == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


class BinIdxReader:
    """Read-only view of a `.bin/.idx` pair; everything is memory-mapped, nothing is loaded eagerly."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = split_prefix(prefix)
        self.idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        self.bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise DataError(f"{p}: no such file (a binidx dataset needs both PREFIX.bin and PREFIX.idx)")
        idx_size = self.idx_path.stat().st_size
        if idx_size < HEADER_SIZE:
            raise DataError(f"{self.idx_path}: {idx_size} bytes is shorter than the 34-byte MMIDIDX header")
        with open(self.idx_path, "rb") as f:
            magic, version, code, n_seq, n_doc = HEADER.unpack(f.read(HEADER_SIZE))
        if magic != MAGIC:
            raise DataError(f"{self.idx_path}: not a Megatron MMIDIDX index (bad magic {magic[:9]!r})")
        if version != VERSION:
            raise DataError(f"{self.idx_path}: unsupported MMIDIDX version {version} (expected 1)")
        if code not in DTYPE_CODES:
            raise DataError(f"{self.idx_path}: unknown dtype code {code}")
        body = 4 * n_seq + 8 * n_seq + 8 * n_doc
        # Megatron-core may append one int8 mode per sequence; accept it, ignore it.
        if idx_size not in (HEADER_SIZE + body, HEADER_SIZE + body + n_seq):
            raise DataError(
                f"{self.idx_path}: size {idx_size} B does not match header ({n_seq} sequences, {n_doc} doc_idx "
                f"entries need {HEADER_SIZE + body} B); the file is truncated or corrupt"
            )
        self.dtype: np.dtype = DTYPE_CODES[code]
        self.dtype_code = code
        self.sizes: np.ndarray = _memmap(self.idx_path, np.dtype(np.int32), HEADER_SIZE, n_seq)
        self.pointers: np.ndarray = _memmap(self.idx_path, np.dtype(np.int64), HEADER_SIZE + 4 * n_seq, n_seq)
        self.doc_idx: np.ndarray = _memmap(self.idx_path, np.dtype(np.int64), HEADER_SIZE + 12 * n_seq, n_doc)
        item = self.dtype.itemsize
        bin_size = self.bin_path.stat().st_size
        if bin_size % item:
            raise DataError(f"{self.bin_path}: size {bin_size} B is not a multiple of the {self.dtype} item size")
        self.num_tokens: int = bin_size // item
        if n_seq:
            end = int(self.pointers[-1]) + int(self.sizes[-1]) * item
            if end > bin_size or int(self.pointers[0]) != 0:
                raise DataError(
                    f"{self.bin_path}: index says the data ends at byte {end} but the file has {bin_size} B; "
                    "the .bin is truncated or belongs to another .idx"
                )
            self._check_sequences(bin_size)
        if n_doc:
            self._check_doc_idx(n_seq)

    def _check_sequences(self, bin_size: int) -> None:
        """Every size non-negative and every sequence inside the .bin, in order (one pass over the index, in
        chunks: a reader of a damaged index must not hand out windows past the data)."""
        item = self.dtype.itemsize
        for lo in range(0, len(self.sizes), 1 << 20):
            sizes = np.asarray(self.sizes[lo : lo + (1 << 20)], dtype=np.int64)
            ptrs = np.asarray(self.pointers[lo : lo + (1 << 20)], dtype=np.int64)
            bad = (sizes < 0) | (ptrs < 0) | (ptrs % item != 0) | (ptrs > bin_size - sizes * item)
            if len(ptrs) > 1:
                bad[1:] |= ptrs[1:] < ptrs[:-1] + sizes[:-1] * item  # overlapping or out of order
            if bad.any():
                i = lo + int(np.argmax(bad))
                raise DataError(f"{self.idx_path}: sequence {i} (size {int(self.sizes[i])}, byte offset "
                                f"{int(self.pointers[i])}) lies outside the {bin_size}-byte .bin or overlaps the one "
                                "before; the index is damaged or belongs to another .bin")

    def _check_doc_idx(self, n_seq: int) -> None:
        doc = np.asarray(self.doc_idx, dtype=np.int64)
        if int(doc[0]) != 0:
            raise DataError(f"{self.idx_path}: doc_idx must start at 0, found {int(doc[0])}")
        if (np.diff(doc) < 0).any() or int(doc[-1]) > n_seq:
            raise DataError(f"{self.idx_path}: doc_idx must rise from 0 to at most the {n_seq} sequences; the index "
                            "is damaged")

    @property
    def num_docs(self) -> int:
        return max(len(self.doc_idx) - 1, 0)

    def tokens(self) -> np.ndarray:
        """The whole `.bin` as one flat memory-mapped array (RWKV-LM's view of the data)."""
        return _memmap(self.bin_path, self.dtype, 0, self.num_tokens)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences in {self.idx_path}")
        i %= n
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens()[start : start + int(self.sizes[i])]

    def __repr__(self) -> str:
        return f"BinIdxReader({str(self.prefix)!r}, {len(self)} seqs, {self.num_tokens} tokens, {self.dtype})"


class BinIdxWriter:
    """Write a `.bin/.idx` pair, one sequence and one document per `add_document`.

    Tokens stream to a temp `.bin`; sizes are kept in a compact int32 array (4 B per document). On a clean
    `close()` (or context exit) both files are fsynced and renamed into place, the `.idx` last, so a pair
    that exists is always complete. On an exception the temps are removed and nothing is left behind.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type | str = np.uint16) -> None:
        self.prefix = split_prefix(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in WRITE_CODES:
            raise DataError(f"binidx token dtype must be uint16 or int32, got {self.dtype}")
        self.bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        self.idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        self._files = AtomicFiles(self.bin_path, self.idx_path)  # committed in this order: the .idx last
        self._bin_tmp, self._idx_tmp = self._files.temps
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115  (closed in close/abort)
        self._sizes = array("i")
        self._max = np.iinfo(self.dtype).max
        self.num_tokens = 0
        self._closed = False

    def add_document(self, tokens: np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise DataError(f"{self.bin_path}: a document must be a 1-D token array, got shape {arr.shape}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > self._max):
            raise DataError(f"{self.bin_path}: token id out of range for {self.dtype} (0..{self._max})")
        if arr.size > np.iinfo(np.int32).max:
            raise DataError(f"{self.bin_path}: document of {arr.size} tokens exceeds the int32 size field")
        self._bin.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        self._sizes.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def add_documents(self, flat: np.ndarray, sizes: np.ndarray) -> None:
        """Append many documents at once: `flat` is their tokens back to back, `sizes` their lengths."""
        flat = np.asarray(flat)
        sizes = np.asarray(sizes, dtype=np.int64)
        if int(sizes.sum()) != flat.size or (sizes.size and int(sizes.min()) < 0):
            raise DataError(f"{self.bin_path}: sizes ({int(sizes.sum())} tokens) do not match {flat.size} tokens")
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) > self._max):
            raise DataError(f"{self.bin_path}: token id out of range for {self.dtype} (0..{self._max})")
        self._bin.write(memoryview(np.ascontiguousarray(flat, dtype=self.dtype)).cast("B"))  # no extra copy
        self._sizes.extend(sizes.astype(np.int32).tolist())
        self.num_tokens += int(flat.size)

    @property
    def num_docs(self) -> int:
        return len(self._sizes)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._bin.close()
            sizes = np.frombuffer(self._sizes, dtype=np.int32) if self._sizes else np.empty(0, np.int32)
            write_index(self._idx_tmp, self.dtype, sizes, np.arange(len(sizes) + 1, dtype=np.int64))
            self._files.commit()  # fsync both, rename both
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop everything written so far; the final names are never touched."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._bin.close()
        self._files.abort()

    def __enter__(self) -> BinIdxWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


IndexPart = np.ndarray | Iterable[np.ndarray]


def _parts(x: IndexPart) -> Iterable[np.ndarray]:
    return [x] if isinstance(x, np.ndarray) else x


def _back_to_back(size_parts: list[np.ndarray], itemsize: int) -> Iterator[np.ndarray]:
    """Byte offsets of sequences laid out back to back: pointer[i] = itemsize * sum(sizes[:i])."""
    start = 0  # in tokens
    for sizes in size_parts:
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
        yield (pointers + start) * itemsize
        start += int(np.sum(sizes, dtype=np.int64))


def write_index(
    path: Path, dtype: np.dtype, sizes: IndexPart, doc_idx: IndexPart, pointers: IndexPart | None = None
) -> None:
    """Write an `.idx`. Each of `sizes`, `doc_idx`, `pointers` is one array or a sequence of parts written back to
    back, so a merge streams its inputs' indexes; `sizes` parts must be re-iterable. Without `pointers`, the
    sequences lie back to back in the `.bin`. Not fsynced: `path` is a temp of `rwkvctl.fs`, synced on commit."""
    dtype = np.dtype(dtype)
    size_parts = [np.asarray(a, dtype=np.int32) for a in _parts(sizes)]
    if pointers is None:
        pointers = _back_to_back(size_parts, dtype.itemsize)
    with open(path, "wb") as f:
        f.write(bytes(HEADER_SIZE))  # the counts are known once every part is written
        counts = []
        for parts, kind in ((size_parts, np.int32), (_parts(pointers), np.int64), (_parts(doc_idx), np.int64)):
            n = 0
            for a in parts:
                a = np.asarray(a, dtype=kind)
                f.write(a.tobytes())
                n += len(a)
            counts.append(n)
        n_seq, n_ptr, n_doc = counts
        if n_ptr != n_seq:
            raise DataError(f"{path}: {n_ptr} pointers for {n_seq} sequences")
        f.seek(0)
        f.write(HEADER.pack(MAGIC, VERSION, WRITE_CODES[dtype], n_seq, n_doc))


# --- magic_prime: RWKV-LM's chunk sampler --------------------------------------------------------------------------

_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # deterministic for n < 3.3e24


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (exact for every n a token count can reach)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def magic_prime(data_size: int, ctx_len: int) -> int:
    """The largest prime p <= data_size//ctx_len - 1 with p % 3 == 2, exactly as RWKV-LM's make_data.py prints.

    RWKV-LM's trainer additionally requires 0.9 < p / (data_size//ctx_len) <= 1; that fails only for tiny
    datasets (a handful of chunks), and we raise then, because RWKV-LM would refuse to start.
    """
    if ctx_len <= 0:
        raise DataError(f"ctx_len must be positive, got {ctx_len}")
    n_chunks = data_size // ctx_len
    p = n_chunks - 1
    # p % 3 == 2 primes: step through candidates congruent to 2 mod 3.
    p -= (p - 2) % 3
    while p >= 2 and not is_prime(p):
        p -= 3
    if p < 2 or not 0.9 < p / n_chunks <= 1:
        raise DataError(
            f"{data_size} tokens hold only {n_chunks} chunks of ctx_len {ctx_len}: too few for RWKV-LM's "
            "magic_prime sampler (needs p/chunks > 0.9); use more data or a smaller ctx_len"
        )
    return p
