"""The filter's dedup as pure functions over numpy arrays, one partition at a time (no Ray, no I/O).

Samples are named by a sample id (`sid`, uint64): the raw shard's index in shard order in the high
32 bits, the sample's row in its key-sorted scan table in the low 32, so sid order is key order.
Each rule keeps the smallest sid of a group and drops the others; the rules run one after another,
each over the survivors of the ones before:

1. `duplicate_url`: samples with the same URL (compared by a 128-bit hash of it);
2. `duplicate_exact`: the same normalised caption and the same image sha256;
3. `near_duplicate`: perceptual hashes within `distance` bits. Samples are linked when their
   hashes are that near, and every connected component keeps only its smallest sid: with
   A ~ B ~ C but A !~ C, both B and C go.

So the decisions are a function of the set of samples only, whatever the partitioning. Rules 1-2
need a hash partitioning by key; rule 3 a partitioning by band (pigeonhole: hashes within d bits
agree exactly on at least one of d + 1 bands), `near_edges` inside each band partition, and the
connected components across partitions (`large_star` / `small_star`, Kiveris et al. 2014,
"Connected Components in MapReduce and Beyond").
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable

import numpy as np

SHARD_BITS = 32
"""Low bits of a sid holding the row within its raw shard."""

_LEAF = 512
"""Groups of at most this many distinct hashes are compared all pairs against all."""


def sample_ids(shard_index: int, rows: int) -> np.ndarray:
    """The sids of rows 0..rows-1 of the raw shard at `shard_index`."""
    return (np.uint64(shard_index) << np.uint64(SHARD_BITS)) + np.arange(rows, dtype=np.uint64)


def shard_index(sid: np.ndarray) -> np.ndarray:
    return (np.asarray(sid, dtype=np.uint64) >> np.uint64(SHARD_BITS)).astype(np.int64)


def normalize_caption(caption: str) -> str:
    """The caption as compared by `duplicate_exact`: lowercased, whitespace runs collapsed."""
    return " ".join(caption.split()).lower()


def hash128(values: Iterable[str]) -> np.ndarray:
    """A (n, 2) uint64 array: blake2b-128 of each string (collisions: ~1e-21 at 250M rows)."""
    digests = b"".join(hashlib.blake2b(v.encode("utf-8", "surrogatepass"), digest_size=16).digest() for v in values)
    return np.frombuffer(digests, dtype="<u8").reshape(-1, 2).copy()


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well spread uint64 for partitioning."""
    x = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def partition_of(x: np.ndarray, parts: int) -> np.ndarray:
    return (mix64(x) % np.uint64(parts)).astype(np.int64)


def later_of_groups(h0: np.ndarray, h1: np.ndarray, sid: np.ndarray) -> np.ndarray:
    """The sids that share their (h0, h1) key with a smaller sid (the ones a key rule drops)."""
    if not len(sid):
        return np.array([], dtype=np.uint64)
    order = np.lexsort((sid, h1, h0))
    h0, h1, sid = h0[order], h1[order], sid[order]
    same = np.concatenate([[False], (h0[1:] == h0[:-1]) & (h1[1:] == h1[:-1])])
    return sid[same]


# -- near duplicates: bands ----------------------------------------------------------------------
def bands(distance: int) -> list[tuple[int, int]]:
    """(shift, width) of the distance + 1 bands cutting the 64 bits (pigeonhole)."""
    edges = [round(i * 64 / (distance + 1)) for i in range(distance + 2)]
    return [(lo, hi - lo) for lo, hi in itertools.pairwise(edges)]


def band_keys(phash: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray]:
    """For n hashes, the (n * (distance + 1),) band keys and the row each came from. A band key
    holds the band's number in its top byte and the band's bits below, so equal keys mean equal
    bits of the same band (at distance 0 the one band is the whole hash)."""
    phash = np.asarray(phash, dtype=np.uint64)
    keys, rows = [], []
    for number, (shift, width) in enumerate(bands(distance)):
        value = (phash >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        keys.append(value | (np.uint64(number) << np.uint64(56)))
        rows.append(np.arange(len(phash)))
    return np.concatenate(keys), np.concatenate(rows)


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x)


def _forest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The links (a, b) reduced to a spanning forest with the same components: (member, root)
    with root the smallest node of its component. A dense cluster of n near hashes has ~n^2
    links but n - 1 forest edges, so links are reduced as they are found."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(a):
        return a, b
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (inverse[: len(a)], inverse[len(a) :])), (len(nodes),) * 2)
    _, label = connected_components(graph, directed=False)
    root = np.full(label.max() + 1, nodes.max(), dtype=nodes.dtype)
    np.minimum.at(root, label, nodes)  # nodes are sorted: each component's smallest
    members = root[label] != nodes
    return nodes[members], root[label][members]


def _all_pairs(hashes: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of `hashes` within `distance` bits, in blocks of bounded memory."""
    n = len(hashes)
    block = max(1, (1 << 21) // max(n, 1))
    left, right = [], []
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        near = _popcount(hashes[rows, None] ^ hashes[None, :]) <= distance
        i, j = np.nonzero(near)
        i = rows[i]
        keep = j > i
        left.append(i[keep])
        right.append(j[keep])
    return np.concatenate(left), np.concatenate(right)


def _near_pairs(hashes: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs of distinct `hashes` within `distance` bits. Only the bits that vary inside the
    group matter; when more than `_LEAF` hashes vary in more than `distance` bits, they are split
    again by pigeonhole on those bits, so one skewed run does not make the search quadratic."""
    n = len(hashes)
    varying = int(np.bitwise_or.reduce(hashes ^ hashes[0]))
    free_bits = [b for b in range(64) if varying >> b & 1]
    if len(free_bits) <= distance:  # they differ in at most `distance` bits: all are near (a star)
        return np.zeros(n - 1, dtype=np.int64), np.arange(1, n)
    if n <= _LEAF:
        return _all_pairs(hashes, distance)
    left, right = [], []
    cuts = [round(k * len(free_bits) / (distance + 1)) for k in range(distance + 2)]
    for lo, hi in itertools.pairwise(cuts):
        value = hashes & np.uint64(sum(1 << b for b in free_bits[lo:hi]))
        order = np.argsort(value, kind="stable")
        bounds = np.flatnonzero(np.diff(value[order])) + 1
        for members in np.split(order, bounds):
            if len(members) > 1:
                i, j = _near_pairs(hashes[members], distance)
                left.append(members[i])
                right.append(members[j])
    if not left:
        return np.array([], dtype=np.int64), np.array([], dtype=np.int64)
    return _forest(np.concatenate(left), np.concatenate(right))


def _sub_bands(distance: int) -> np.ndarray:
    """(band, sub-band) -> mask: the bits outside each band cut into distance + 1 sub-bands."""
    masks = np.zeros((distance + 1, distance + 1), dtype=np.uint64)
    for i, (shift, width) in enumerate(bands(distance)):
        free = [b for b in range(64) if not shift <= b < shift + width]
        cuts = [round(k * len(free) / (distance + 1)) for k in range(distance + 2)]
        for j, (lo, hi) in enumerate(itertools.pairwise(cuts)):
            masks[i, j] = np.uint64(sum(1 << b for b in free[lo:hi]))
    return masks


def _pairs_sharing(k1: np.ndarray, k2: np.ndarray, hashes: np.ndarray, distance: int):
    """Index pairs of rows with equal (k1, k2) whose hashes are within `distance` bits, comparing
    only inside runs of equal keys, all runs at once (one vectorised pass per offset, so the work
    is the sum of the runs' squares, not a Python loop per run). Runs longer than `_LEAF` are
    not compared; their row indices come back for a further split.

    The two keys are mixed into one 64-bit key for a single sort: equal keys stay equal, and the
    rare unequal ones that collide only add comparisons (every pair is checked bit by bit)."""
    n = len(hashes)
    key = mix64(mix64(k1) ^ k2)
    order = np.argsort(key)
    key = key[order]
    starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    lengths = np.diff(np.concatenate([starts, [n]]))
    long = [order[s : s + n_] for s, n_ in zip(starts[lengths > _LEAF], lengths[lengths > _LEAF])]
    active = np.flatnonzero(np.repeat(lengths, lengths) <= np.minimum(_LEAF, n))
    left, right = [], []
    offset = 1
    while len(active):
        nxt = active + offset
        ok = nxt < n
        active, nxt = active[ok], nxt[ok]
        ok = key[active] == key[nxt]  # still inside the run
        active, nxt = active[ok], nxt[ok]
        a, b = order[active], order[nxt]
        near = _popcount(hashes[a] ^ hashes[b]) <= distance
        left.append(a[near])
        right.append(b[near])
        offset += 1
    empty = np.array([], dtype=np.int64)
    return (np.concatenate(left) if left else empty), (np.concatenate(right) if right else empty), long


def near_edges(band_key: np.ndarray, sid: np.ndarray, phash: np.ndarray, distance: int) -> np.ndarray:
    """The near-duplicate links found in one band partition, reduced to a forest: a (m, 2) uint64
    array of (sid, root), root being the smallest sid of the sid's component among these links.

    Rows are (band key, sid, phash), one per band of a sample that routed here. Samples with the
    same hash are linked without comparing (a million blank images cost one sort). Distinct hashes
    sharing a band value are compared only when they also share one of distance + 1 sub-bands of
    the other bits (pigeonhole again), so the comparisons grow with the rows, not their square;
    a run still longer than `_LEAF` (a skewed band) is split further by `_near_pairs`. What does
    grow faster is a dense cluster (thousands of distinct hashes varying in a few bits): its near
    pairs are quadratic in it, and so is finding them; the links are kept as a forest, so memory
    stays linear."""
    if not len(sid):
        return np.empty((0, 2), dtype=np.uint64)
    links_a, links_b = [], []
    # identical hashes: link every sample to the smallest sid of its hash
    order = np.lexsort((sid, phash))
    pairs = np.stack([phash[order], sid[order]], axis=1)  # sorted by (phash, sid)
    unique = pairs[np.concatenate([[True], np.any(pairs[1:] != pairs[:-1], axis=1)])]
    first = np.concatenate([[True], unique[1:, 0] != unique[:-1, 0]])
    rep_of_hash = np.maximum.accumulate(np.where(first, np.arange(len(unique)), 0))
    links_a.append(unique[~first, 1])
    links_b.append(unique[rep_of_hash[~first], 1])
    # distinct hashes (at distance 0 there is nothing more): one row per (band, sample) left,
    # compared by sub-band
    keep = np.isin(sid, unique[first, 1])
    band_key, sid, phash = band_key[keep], sid[keep], phash[keep]
    number = (band_key >> np.uint64(56)).astype(np.int64) if distance else np.zeros(len(sid), np.int64)
    masks = _sub_bands(distance)
    searched: set[bytes] = set()
    for j in range(distance + 1 if distance else 0):
        i, k, long = _pairs_sharing(band_key, phash & masks[number, j], phash, distance)
        links_a.append(sid[i])
        links_b.append(sid[k])
        for run in long:
            digest = hashlib.blake2b(np.sort(sid[run]).tobytes(), digest_size=16).digest()
            if digest in searched:  # the same hashes agree on another band and sub-band too
                continue
            searched.add(digest)
            i, k = _near_pairs(phash[run], distance)
            links_a.append(sid[run[i]])
            links_b.append(sid[run[k]])
        a, b = _forest(np.concatenate(links_a).astype(np.uint64), np.concatenate(links_b).astype(np.uint64))
        links_a, links_b = [a], [b]
    a, b = _forest(np.concatenate(links_a).astype(np.uint64), np.concatenate(links_b).astype(np.uint64))
    return np.stack([a, b], axis=1) if len(a) else np.empty((0, 2), dtype=np.uint64)


# -- connected components across partitions ------------------------------------------------------
def both_ways(edges: np.ndarray) -> np.ndarray:
    """Each undirected edge (a, b), a != b, as the rows (a, b) and (b, a), without repeats."""
    edges = edges[edges[:, 0] != edges[:, 1]]
    return np.unique(np.concatenate([edges, edges[:, ::-1]]), axis=0)


def _neighbourhoods(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed rows (u, v) grouped by u: (sorted unique rows, start of each u's run, its u)."""
    rows = np.unique(rows, axis=0)
    starts = np.flatnonzero(np.concatenate([[True], rows[1:, 0] != rows[:-1, 0]])) if len(rows) else np.array([], int)
    return rows, starts, rows[starts, 0] if len(rows) else np.array([], dtype=np.uint64)


def large_star(rows: np.ndarray) -> tuple[np.ndarray, int]:
    """One large-star step over the neighbourhoods of the nodes u of `rows` (every row (u, v) of
    those nodes): each larger neighbour v > u is linked to m(u), the smallest of u and its
    neighbours. Returns the new undirected edges and how many of them replaced an old one."""
    rows, starts, _ = _neighbourhoods(rows)
    if not len(rows):
        return np.empty((0, 2), dtype=np.uint64), 0
    smallest = np.minimum(np.minimum.reduceat(rows[:, 1], starts), rows[starts, 0])
    m = np.repeat(smallest, np.diff(np.concatenate([starts, [len(rows)]])))
    upper = rows[:, 1] > rows[:, 0]
    edges = np.stack([rows[upper, 1], m[upper]], axis=1)
    changed = int(np.count_nonzero(m[upper] < rows[upper, 0]))
    return edges, changed


def small_star(rows: np.ndarray) -> tuple[np.ndarray, int]:
    """One small-star step: each node u with smaller neighbours N links them and itself to
    m = min(N). Returns the new undirected edges and how many replaced an old one (|N| - 1 per u)."""
    rows, _, _ = _neighbourhoods(rows)
    lower = rows[rows[:, 1] < rows[:, 0]]
    if not len(lower):
        return np.empty((0, 2), dtype=np.uint64), 0
    starts = np.flatnonzero(np.concatenate([[True], lower[1:, 0] != lower[:-1, 0]]))
    counts = np.diff(np.concatenate([starts, [len(lower)]]))
    smallest = np.repeat(lower[starts, 1], counts)  # rows are sorted: the first v of a run is min
    to_min = np.stack([lower[:, 1], smallest], axis=1)
    edges = np.concatenate([to_min, np.stack([lower[starts, 0], lower[starts, 1]], axis=1)])
    return edges, int((counts - 1).sum())


def non_roots(rows: np.ndarray) -> np.ndarray:
    """After the stars converged, the sids with a smaller neighbour: every member of a component
    but its smallest."""
    return np.unique(rows[rows[:, 1] < rows[:, 0], 0])
