"""MinHash, LSH and word n-gram hashing for deduplication and decontamination, vectorised over whole batches.

Every function works on a batch of texts at once with numpy and Arrow kernels: no Python loop runs per word,
shingle or permutation (the loops below run over positions inside a window, a handful of iterations). Hashes are
stable across processes and machines (no Python ``hash``), so that signatures computed by different Ray workers,
or again in a later pass, agree.

- Normalisation: Unicode NFKC, lower case, punctuation and symbols removed, words split on whitespace.
- Word hashes: a polynomial hash of each word's UTF-8 bytes, avalanched by MurmurHash3's 64-bit finaliser.
- Window hashes (shingles, n-grams): position-weighted sums of the word hashes, avalanched. A text shorter than the
  window contributes its whole word sequence as one window (so short texts still have a signature and a gram).
- MinHash: Carter-Wegman universal hashing ``((a * x + b) mod p) mod 2**32`` with ``p = 2**61 - 1`` (a Mersenne
  prime, as datasketch's original scheme), ``x`` the 32-bit shingle hash, ``a, b`` drawn from ``seed``.
- LSH: bands and rows chosen as datasketch does (minimise the weighted false positive and false negative areas under
  the S-curve); a band key is a 64-bit hash of the band's rows.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MERSENNE_61 = np.uint64((1 << 61) - 1)
MAX_HASH = np.uint32(0xFFFFFFFF)  # the signature value of a text without shingles (an empty text)
_M32 = np.uint64(0xFFFFFFFF)
_PUNCTUATION = r"[\p{P}\p{S}]+"  # Unicode punctuation and symbols (RE2 classes)
_BYTE_BASE = np.uint64(0x100000001B3)  # FNV's 64-bit prime: the base of the per-word polynomial


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: a bijection that spreads every input bit over the output (in place)."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


@lru_cache(maxsize=None)
def _position_weights(count: int, salt: int) -> np.ndarray:
    """Odd 64-bit weights, one per position in a window (so word order matters), fixed for all processes."""
    w = _fmix64(np.arange(1, count + 1, dtype=np.uint64) + np.uint64((salt * 0x9E3779B97F4A7C15) % (1 << 64)))
    return w | np.uint64(1)


# ------------------------------------------------------------------------------------------------ text to words
def as_arrow(texts) -> pa.Array:
    if isinstance(texts, pa.ChunkedArray):
        return texts.combine_chunks()
    if isinstance(texts, pa.Array):
        return texts
    return pa.array(list(texts), pa.string())


def normalised_words(texts) -> pa.ListArray:
    """Each text as its list of normalised words (NFKC, lower case, punctuation and symbols removed)."""
    text = pc.utf8_normalize(as_arrow(texts), "NFKC")
    text = pc.replace_substring_regex(pc.utf8_lower(text), _PUNCTUATION, "")
    words = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(text))
    if isinstance(words, pa.ChunkedArray):
        words = words.combine_chunks()
    flat = words.flatten()
    nonempty = pc.greater(pc.binary_length(flat), 0).to_numpy(zero_copy_only=False)
    if nonempty.all():
        return words
    # Arrow's split gives [""] for an empty (or all-punctuation) text: such a text has no words.
    kept_before = np.concatenate([[0], np.cumsum(nonempty)])
    offsets = kept_before[_list_offsets(words)].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(pa.array(nonempty)))


def normalise(texts) -> list[str]:
    """The normalised texts (words joined by one space): what exact deduplication compares."""
    return pc.binary_join(normalised_words(texts), " ").to_pylist()


def _list_offsets(words: pa.ListArray) -> np.ndarray:
    """Start of each text's words in ``words.flatten()`` (length ``len(words) + 1``, first value 0)."""
    offsets = words.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0]


def word_hashes(words: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash of every word, in text order; offsets of each text's words). The distinct words of the batch
    are hashed once each (Arrow's dictionary encoding), vectorised over their UTF-8 bytes: byte ``k`` of a word
    weighs ``base**k``, and the word's length is mixed in."""
    flat = words.flatten()
    if isinstance(flat, pa.ChunkedArray):
        flat = flat.combine_chunks()
    if len(flat) == 0:
        return np.zeros(0, np.uint64), _list_offsets(words)
    encoded = pc.dictionary_encode(flat)
    distinct = _bytes_hashes(encoded.dictionary)
    return distinct[encoded.indices.to_numpy()], _list_offsets(words)


def _bytes_hashes(strings: pa.Array) -> np.ndarray:
    n = len(strings)
    offset_type = np.int64 if pa.types.is_large_string(strings.type) else np.int32
    bounds = np.frombuffer(strings.buffers()[1], offset_type)[strings.offset:strings.offset + n + 1].astype(np.int64)
    data = np.frombuffer(strings.buffers()[2], np.uint8)[bounds[0]:bounds[-1]]
    starts, lengths = bounds[:-1] - bounds[0], np.diff(bounds)
    position = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lengths)
    weighted = data.astype(np.uint64) * _byte_powers(int(lengths.max()))[position]
    h = np.add.reduceat(weighted, starts) + lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return _fmix64(h)


def _byte_powers(length: int) -> np.ndarray:
    size = 1 << max(6, int(length - 1).bit_length())  # cached by powers of two: long tokens are rare
    return _byte_powers_of_size(size)


@lru_cache(maxsize=32)
def _byte_powers_of_size(size: int) -> np.ndarray:
    powers = np.empty(size, np.uint64)
    powers[0] = 1
    with np.errstate(over="ignore"):
        for i in range(1, size):  # once per size, then cached
            powers[i] = powers[i - 1] * _BYTE_BASE
    return powers


def window_hashes(hashes: np.ndarray, offsets: np.ndarray, width: int, salt: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every run of ``width`` consecutive words of each text (a text shorter than ``width``, if not
    empty, gives one window of all its words). Returns (hashes, offsets of each text's windows).

    Windows are hashed at every position of the batch's word array at once (``width`` shifted slices), then those
    that would cross into the next text are dropped; the few short texts are hashed apart."""
    counts = np.diff(offsets)
    windows = np.where(counts >= width, counts - width + 1, np.minimum(counts, 1))
    window_offsets = np.concatenate([[0], np.cumsum(windows)]).astype(np.int64)
    total = int(window_offsets[-1])
    out = np.empty(total, np.uint64)
    if total == 0:
        return out, window_offsets
    weights = _position_weights(width, salt)
    length_term = _length_term(width)
    short = np.flatnonzero((counts > 0) & (counts < width))
    in_short = np.zeros(total, bool)
    in_short[window_offsets[short]] = True
    n = len(hashes)
    if n >= width:
        acc = np.full(n - width + 1, length_term, np.uint64)
        for j in range(width):  # ``width`` vector operations over the whole batch
            acc += hashes[j:n - width + 1 + j] * weights[j]
        # starts whose window runs past the end of their text: the last width - 1 positions of each text
        ends = offsets[1:]
        crossing = ends[:, None] - np.arange(1, width)[None, :]
        crossing = crossing[(crossing >= offsets[:-1, None]) & (crossing < len(acc))]
        valid = np.ones(len(acc), bool)
        valid[crossing] = False
        out[~in_short] = _fmix64(acc[valid])
    if len(short):
        out[in_short] = _whole_sequence_hashes(hashes, offsets[short], counts[short], length_term, weights)
    return out, window_offsets


def _length_term(width: int) -> np.uint64:
    return np.uint64((width * 0xD6E8FEB86659FD93) % (1 << 64))


def run_hashes(hashes: np.ndarray, offsets: np.ndarray, starts: np.ndarray, widths,
               salt: int = 0) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """For each width in ``widths``: (width, the ``starts`` whose text has at least ``width`` words from there on,
    the hash of those runs of ``width`` words). ``starts`` are positions in the batch's word array (ascending);
    a run's hash is the one ``window_hashes(hashes, offsets, width, salt)`` gives the same window, so runs of
    several widths are compared with windows of those widths. The widths share one accumulation: ``max(widths)``
    gathers over the starts in all (fewer as the starts too close to their text's end drop out)."""
    widths = sorted(set(int(w) for w in widths))
    out: list[tuple[int, np.ndarray, np.ndarray]] = []
    if not widths:
        return out
    counts = np.diff(offsets)
    starts = np.asarray(starts, np.int64)
    room = np.repeat(offsets[1:], counts)[starts] - starts if len(starts) else np.zeros(0, np.int64)
    weights = _position_weights(widths[-1], salt)
    acc = np.zeros(len(starts), np.uint64)
    done = 0
    for width in widths:
        fits = room >= width  # later widths are larger: the others are dropped for good
        starts, room, acc = starts[fits], room[fits], acc[fits]
        for j in range(done, width):  # positions not yet summed for the remaining starts
            acc += hashes[starts + j] * weights[j]
        done = width
        out.append((width, starts, _fmix64(acc + _length_term(width))))
    return out


def _whole_sequence_hashes(hashes, starts, counts, length_term, weights) -> np.ndarray:
    """Hashes of texts shorter than a window: all their words, weighted as a window's first positions."""
    acc = counts.astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93) ^ length_term
    for j in range(int(counts.max())):
        present = j < counts
        acc[present] += hashes[starts[present] + j] * weights[j]
    return _fmix64(acc)


def sequence_hashes(hashes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """One 64-bit hash per text of its whole word sequence (exact deduplication's key), from its word hashes."""
    counts = np.diff(offsets)
    position = np.arange(len(hashes), dtype=np.int64) - np.repeat(offsets[:-1], counts)
    weights = _fmix64(position.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(7)) | np.uint64(1)
    sums = np.zeros(len(counts), np.uint64)
    nonempty = counts > 0
    if len(hashes):
        sums[nonempty] = np.add.reduceat(hashes * weights, offsets[:-1][nonempty])
    return _fmix64(sums + counts.astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93))


def text_hashes(texts) -> np.ndarray:
    """Exact-duplicate keys of a batch of texts: equal exactly when their normalised texts are equal (up to a
    2**-64 chance)."""
    return sequence_hashes(*word_hashes(normalised_words(texts)))


def ngram_hashes(texts, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes of every word ``n``-gram of each text, offsets per text): decontamination's grams."""
    return window_hashes(*word_hashes(normalised_words(texts)), n, salt=NGRAM_SALT)


NGRAM_SALT = 1  # n-grams and shingles of the same width hash differently (they are never compared)


# ------------------------------------------------------------------------------------------------------ MinHash
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the ``num_perm`` hash functions. ``a`` and ``b`` stay below 2**32 so that ``a * x + b`` (x < 2**32)
    fits in 64 bits exactly and the reduction mod the Mersenne prime needs no wide arithmetic."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 32, num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 32, num_perm, dtype=np.uint64)
    return a, b


# Shingles hashed at a time: the [num_perm, shingles] work array stays within the CPU caches (measured on 2M
# shingles x 128 permutations: 2 ns per value in this layout, 3-12 ns with shingles as rows or in bigger chunks).
_CHUNK_SHINGLES = 1024


def signatures(shingles: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures ``[texts, num_perm]`` (uint32) from 64-bit shingle hashes and each text's offsets.

    For every chunk of whole texts: ``h = ((a * x + b) mod p) mod 2**32`` for all permutations and shingles at once,
    then the minimum per permutation and text with one ``np.minimum.reduceat`` (as datasketch, the hash is cut to 32
    bits before the minimum: the high bits of ``a * x`` for a < 2**32 follow x's order too closely to be a random
    permutation). ``x mod p`` for the Mersenne prime is ``(x & p) + (x >> 61)``; cut to 32 bits that is
    ``low32(x + (x >> 61))`` (the result may exceed p by at most 7, with probability ~2**-58 per value: the final
    conditional subtraction is left out)."""
    a, b = permutations(num_perm, seed)
    a, b = a[:, None], b[:, None]
    x = (shingles >> np.uint64(32)) ^ (shingles & _M32)  # 32-bit shingle values, like datasketch's
    n_texts = len(offsets) - 1
    out = np.full((n_texts, num_perm), MAX_HASH, np.uint32)
    counts = np.diff(offsets)
    first = 0
    while first < n_texts:
        # the texts of this chunk: at least one, then as many as fit in _CHUNK_SHINGLES shingles
        last = int(np.searchsorted(offsets, offsets[first] + _CHUNK_SHINGLES, side="right")) - 1
        last = min(max(last, first + 1), n_texts)
        lo, hi = int(offsets[first]), int(offsets[last])
        if hi > lo:
            h = a * x[None, lo:hi]
            h += b
            h += h >> np.uint64(61)  # low 32 bits of (h & p) + (h >> 61), i.e. of h mod p
            h32 = h.astype(np.uint32)
            nonempty = np.flatnonzero(counts[first:last] > 0) + first
            out[nonempty] = np.minimum.reduceat(h32, offsets[nonempty] - lo, axis=1).T
        first = last
    return out


def minhash_texts(texts, num_perm: int, shingle_words: int, seed: int) -> np.ndarray:
    """Signatures of a batch of texts, from their normalised word shingles."""
    return signatures(*window_hashes(*word_hashes(normalised_words(texts)), shingle_words), num_perm, seed)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of equal signature values, row by row (``a``, ``b``: ``[n, num_perm]`` or broadcastable)."""
    return (a == b).mean(axis=-1)


# ---------------------------------------------------------------------------------------------------------- LSH
def lsh_params(threshold: float, num_perm: int, false_positive_weight: float = 0.5,
               false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising the weighted area of false positives (Jaccard below the threshold, yet sharing a
    band: ``1 - (1 - s**r)**b``) and false negatives (above it, sharing none), as datasketch's ``_optimal_param``."""
    s = np.linspace(0.0, 1.0, 2001)
    below, above = s <= threshold, s >= threshold
    best, choice = np.inf, (1, num_perm)
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1, dtype=np.float64)
        candidate = 1.0 - (1.0 - s[None, :] ** r[:, None]) ** b  # [rows choices, grid]
        fp = np.trapezoid(candidate[:, below], s[below], axis=1)
        fn = np.trapezoid(1.0 - candidate[:, above], s[above], axis=1)
        error = false_positive_weight * fp + false_negative_weight * fn
        i = int(np.argmin(error))
        if error[i] < best - 1e-12:
            best, choice = float(error[i]), (b, int(r[i]))
    return choice


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``[texts, bands]`` uint64: a hash of each band's ``rows`` signature values. Two texts share a key in a band
    when (up to a 2**-64 chance) their signatures agree on all of that band's rows."""
    weights = _position_weights(rows, salt=2)
    keys = np.empty((len(sig), bands), np.uint64)
    for band in range(bands):
        acc = np.full(len(sig), np.uint64(band), np.uint64)
        for j in range(rows):
            acc += sig[:, band * rows + j].astype(np.uint64) * weights[j]
        keys[:, band] = _fmix64(acc)
    return keys
