"""find_transposed_copies on hand-made facts and a reader over NumPy arrays: the pure pass, called directly."""

from __future__ import annotations

import numpy as np

from tiecheck.analyses.duplicates import TransposedCopy, find_transposed_copies, transposed_findings
from tiecheck.facts import TensorFact


class ArrayReader:
    """A TransposeReader over 2-D float32 arrays; samples are elements 0, 1 and -1 of the row-major order."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.bytes_read = 0

    def sample(self, name: str) -> bytes:
        return self.arrays[name].ravel()[[0, 1, -1]].tobytes()

    def sample_transposed(self, name: str) -> bytes:
        return self.arrays[name].T.ravel()[[0, 1, -1]].tobytes()

    def is_constant(self, name: str) -> bool:
        return len(np.unique(self.arrays[name])) == 1

    def equal(self, a: str, b: str) -> bool:
        return np.array_equal(self.arrays[a], self.arrays[b])

    def equal_transposed(self, a: str, b: str) -> bool:
        self.bytes_read += self.arrays[a].nbytes + self.arrays[b].nbytes
        return np.array_equal(self.arrays[a], self.arrays[b].T)


def _fact(name: str, shape: tuple[int, int], storage: int) -> TensorFact:
    return TensorFact(name=name, shape=shape, stride=(shape[1], 1), dtype="float32", itemsize=4, device="cpu",
                      storage=("cpu", storage), byte_start=0, byte_end=4 * shape[0] * shape[1])


E = np.arange(6, dtype=np.float32).reshape(2, 3)
ARRAYS = {"emb": E, "head": E.T.copy(), "other": E.T.copy() + np.float32([[0, 0], [0, 1], [0, 0]])}
FACTS = [_fact("emb", (2, 3), 1), _fact("head", (3, 2), 2), _fact("other", (3, 2), 3)]


def test_a_transposed_copy_found_without_a_prebuilt_index():
    copies, stats = find_transposed_copies(FACTS, ArrayReader(ARRAYS))
    assert copies == [TransposedCopy(names=("emb", "head"), aliases=(("emb",), ("head",)),
                                     shapes=((2, 3), (3, 2)), dtype="float32", nbytes=24)]
    # "other" differs from emb.T in element [1, 1] only, which no sample reads: compared in full, not a copy.
    assert (stats.tensors, stats.buckets, stats.sampled, stats.full_comparisons, stats.bytes_read) == (3, 1, 3, 2, 96)
    assert copies[0].to_dict() == {"names": ["emb", "head"], "shapes": [[2, 3], [3, 2]], "dtype": "float32",
                                   "bytes_wasted": 24}
    (f,) = transposed_findings(copies)
    assert f.message.startswith("head [3, 2] holds the transpose of emb [2, 3] (float32) in separate memory (24 bytes")
    assert transposed_findings(copies, reported=[("head", "emb")]) == []
    # A reported pair that holds only one side of the copy does not stand for it.
    assert len(transposed_findings(copies, reported=[("emb", "x")])) == 1
    assert len(transposed_findings(copies, reported=[("head", "x")])) == 1


def test_skipped_names_are_left_out():
    copies, stats = find_transposed_copies(FACTS, ArrayReader(ARRAYS), skip={"head"})
    assert copies == []
    assert stats.full_comparisons == 1


def _square(name: str, storage: int) -> TensorFact:
    return _fact(name, (2, 2), storage)


def test_square_pairs_once_symmetric_and_constant_never():
    s = np.float32([[1, 2], [3, 4]])
    arrays = {"s": s, "st": s.T.copy(), "sym": np.float32([[5, 6], [6, 5]]), "zeros": np.zeros((2, 2), np.float32),
              "zeros2": np.zeros((2, 2), np.float32)}
    facts = [_square(n, i) for i, n in enumerate(arrays, 1)]
    copies, stats = find_transposed_copies(facts, ArrayReader(arrays))
    # s and st meet both ways (s's sample against st's transposed one, and the reverse): compared once.
    # sym equals its own transpose: not a copy. The zero matrices equal any transpose of zeros: left out.
    assert [(c.names, c.shapes) for c in copies] == [(("s", "st"), ((2, 2), (2, 2)))]
    assert (stats.tensors, stats.buckets, stats.sampled, stats.full_comparisons) == (5, 1, 10, 1)


def test_a_constant_matrix_is_never_compared_even_when_a_sample_matches():
    # a's sampled elements (0, 1 and the last) are all zero though a is not constant; b is all zeros.
    arrays = {"a": np.float32([[0, 0, 7], [1, 2, 0]]), "b": np.zeros((3, 2), np.float32)}
    copies, stats = find_transposed_copies([_fact("a", (2, 3), 1), _fact("b", (3, 2), 2)], ArrayReader(arrays))
    assert copies == []
    assert (stats.sampled, stats.full_comparisons, stats.bytes_read) == (2, 0, 0)


def test_a_two_element_row_and_column_are_a_transposed_copy():
    # The smallest matrices that can be transposed copies: [1, 2] and [2, 1] holding the same two values.
    arrays = {"row": np.float32([[1, 2]]), "col": np.float32([[1], [2]])}
    copies, _ = find_transposed_copies([_fact("row", (1, 2), 1), _fact("col", (2, 1), 2)], ArrayReader(arrays))
    assert [(c.names, c.shapes) for c in copies] == [(("row", "col"), ((1, 2), (2, 1)))]
