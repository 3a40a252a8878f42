"""Beam search and flat search: a small hand-made tree checked against exhaustive enumeration (both beam search
implementations), and the fast candidate-only `beam_search` checked against the dense reference
`beam_search_dense` on random trees, in both geometries, and through `HierLoc`."""

import math

import numpy as np
import pytest
import torch

from hierloc.errors import InputError
from hierloc.inference.search import (EntityDistances, beam_search, beam_search_dense, child_index, final_width,
                                      flat_search, local_parents)
from tests.helpers import assert_same_result

# Tree: 2 countries; 3 regions (0,0,1); 4 subregions (0,1,2,2); 6 cities (0,0,1,2,3,3)
PARENTS = [-1, -1, 0, 0, 1, 2, 3, 4, 4, 5, 5, 6, 7, 8, 8]
OFFSETS = [0, 2, 5, 9, 15]


class MatrixDistances:
    """`CandidateDistances` served from precomputed per-level matrices, so both searches see the same numbers.

    The "points" handed to the search are query row numbers, (B, 1) floats."""

    def __init__(self, level_sqdists):
        self.full = torch.cat(level_sqdists, dim=1)  # (B, E): columns are global entity ids

    def level_sqdist(self, points, lo, hi):
        return self.full[points[:, 0].long(), lo:hi]

    def pair_sqdist(self, points, rows, ids):
        return self.full[points[rows, 0].long(), ids]


def fast_search(level_sqdists, parents, offsets, tau, beam, top_k, chunk=256, temperatures=None):
    """`beam_search` on the same distances as `beam_search_dense(level_sqdists, ...)`."""
    batch = level_sqdists[0].shape[0]
    queries = torch.arange(batch, dtype=torch.float32).unsqueeze(1)
    return beam_search(queries, MatrixDistances(level_sqdists), child_index(parents, offsets), tau, beam=beam,
                       top_k=top_k, chunk=chunk, temperatures=temperatures)


def dense_search(level_sqdists, parents, offsets, tau, beam, top_k, temperatures=None):
    return beam_search_dense(level_sqdists, local_parents(torch.as_tensor(parents), offsets), offsets, tau,
                             beam=beam, top_k=top_k, temperatures=temperatures)


SEARCHES = {"dense": dense_search, "fast": fast_search}


def _tree():
    return torch.tensor(PARENTS)


def _random_sqdists(batch, seed, offsets=OFFSETS):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, offsets[i + 1] - offsets[i], generator=gen) * 4 for i in range(4)]


def _exhaustive_best(sq, parents, tau, row):
    """Best full path by brute force, with the beam's conditional normalisation when the beam covers everything."""
    cities = range(OFFSETS[3], OFFSETS[4])
    best, best_score = None, -float("inf")
    logp0 = torch.log_softmax(-sq[0][row] / tau, 0)
    for city in cities:
        path = [city]
        while parents[path[0]] >= 0:
            path.insert(0, int(parents[path[0]]))
        score = float(logp0[path[0]])
        for level in range(1, 4):
            # with an unbounded beam every entity of the level is a candidate
            logp = torch.log_softmax(-sq[level][row] / tau, 0)
            score += float(logp[path[level] - OFFSETS[level]])
        if score > best_score:
            best, best_score = path, score
    return best, best_score


# ----------------------------------------------------------------------------- both implementations, by hand
@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_equals_exhaustive_search(search, seed):
    parents = _tree()
    sq = _random_sqdists(4, seed)
    result = SEARCHES[search](sq, parents, OFFSETS, 0.5, beam=100, top_k=3)
    for row in range(4):
        best, best_score = _exhaustive_best(sq, parents, 0.5, row)
        assert result.paths[row, 0].tolist() == best
        assert result.scores[row, 0].item() == pytest.approx(best_score, abs=1e-5)


@pytest.mark.parametrize("search", SEARCHES)
def test_paths_are_consistent_with_the_tree_and_sorted(search):
    sq = _random_sqdists(8, 5)
    result = SEARCHES[search](sq, _tree(), OFFSETS, 0.3, beam=2, top_k=2)
    for row in range(8):
        assert result.scores[row, 0] >= result.scores[row, 1]
        for k in range(2):
            path = result.paths[row, k].tolist()
            for level in range(1, 4):
                assert PARENTS[path[level]] == path[level - 1]
            # the score is the sum of the logs of the reported level probabilities
            assert result.level_probs[row, k].log().sum().item() == pytest.approx(result.scores[row, k].item(),
                                                                                 abs=1e-4)


@pytest.mark.parametrize("search", SEARCHES)
def test_beam_of_one_is_greedy(search):
    sq = _random_sqdists(5, 9)
    result = SEARCHES[search](sq, _tree(), OFFSETS, 1.0, beam=1, top_k=1)
    for row in range(5):
        node = int(sq[0][row].argmin())
        path = [node]
        for level in range(1, 4):
            children = [e for e in range(OFFSETS[level], OFFSETS[level + 1]) if PARENTS[e] == path[-1]]
            path.append(min(children, key=lambda e: float(sq[level][row, e - OFFSETS[level]])))
        assert result.paths[row, 0].tolist() == path


@pytest.mark.parametrize("search", SEARCHES)
def test_entity_without_children_is_carried_down(search):
    # country 1 has region 2 with no subregion: a pruned branch
    parents = torch.tensor([-1, -1, 0, 1, 2, 4])
    offsets = [0, 2, 4, 5, 6]
    sq = [torch.tensor([[5.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0]]), torch.tensor([[0.0]])]
    result = SEARCHES[search](sq, parents, offsets, 0.1, beam=3, top_k=2)
    assert result.paths[0, 0].tolist() == [1, 3, -1, -1]
    assert result.paths[0, 1].tolist() == [0, 2, 4, 5]
    # absent levels have probability 0; the carried path keeps its score
    assert result.level_probs[0, 0, 2:].tolist() == [0.0, 0.0]
    expected = sum(float(torch.log_softmax(-sq[level][0] / 0.1, 0)[1]) for level in (0, 1))
    assert result.scores[0, 0].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("search", SEARCHES)
def test_beam_wider_than_the_tree_pads_with_empty_paths(search):
    # 2 countries, each with exactly one region, subregion and city: only 2 full paths exist
    parents = torch.tensor([-1, -1, 0, 1, 2, 3, 4, 5])
    offsets = [0, 2, 4, 6, 8]
    sq = _random_sqdists(3, 4, offsets)
    result = SEARCHES[search](sq, parents, offsets, 0.5, beam=10, top_k=5)
    assert final_width([2, 2, 2, 2], beam=10) == 8  # 2 countries, then 2 + 2, 2 + 4, 2 + 6 entries (dead ones)
    assert result.paths.shape == (3, 5, 4)
    assert torch.isfinite(result.scores[:, :2]).all() and torch.isinf(result.scores[:, 2:]).all()
    assert (result.paths[:, 2:] == -1).all() and (result.level_probs[:, 2:] == 0).all()


def test_flat_search_returns_nearest_city_and_its_ancestors():
    parents = _tree()
    sq = _random_sqdists(6, 3)
    result = flat_search(sq, parents, OFFSETS, tau=0.5, top_k=2)
    for row in range(6):
        city = int(sq[3][row].argmin()) + OFFSETS[3]
        path = result.paths[row, 0].tolist()
        assert path[3] == city
        assert path[2] == PARENTS[city] and path[1] == PARENTS[path[2]] and path[0] == PARENTS[path[1]]


# ------------------------------------------------------------------------------------------- random trees
def random_tree(sizes, seed, shuffle=False, childless=True):
    """Parents (E,) and offsets (5,) of a random tree with `sizes` entities per level.

    childless: the first entity of every level above the cities gets no child (a --min-images-pruned branch;
    its region/subregion then ends the path). shuffle: entities inside a level in random order (children not
    contiguous)."""
    rng = np.random.default_rng(seed)
    offsets = [0, *np.cumsum(sizes).tolist()]
    parents = [-1] * sizes[0]
    for level in range(1, 4):
        choices = np.arange(sizes[level - 1])
        if childless and sizes[level - 1] > 1:
            choices = choices[1:]
        local = rng.choice(choices, sizes[level])
        local[:len(choices)] = rng.permutation(choices)[:sizes[level]]  # most parents get at least one child
        parents += (offsets[level - 1] + (local if shuffle else np.sort(local))).tolist()
    return torch.tensor(parents), offsets


TREES = {
    "pruned": ([4, 9, 20, 60], False),            # childless region and subregion
    "shuffled": ([4, 9, 20, 60], True),           # children not contiguous: the CSR index sorts them
    "one-country": ([1, 5, 11, 30], False),
    "one-region": ([3, 1, 6, 15], False),         # two of three countries are carried down alone
    "one-city": ([2, 3, 4, 1], False),
    "bushy": ([6, 30, 120, 500], True),
}


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("beam,top_k", [(1, 1), (3, 2), (10, 5), (500, 1000)])
def test_fast_beam_search_equals_the_dense_reference(tree, beam, top_k):
    sizes, shuffle = TREES[tree]
    parents, offsets = random_tree(sizes, seed=len(tree) + beam, shuffle=shuffle)
    sq = _random_sqdists(23, seed=beam, offsets=offsets)
    dense = dense_search(sq, parents, offsets, 0.5, beam, top_k)
    # chunk 5: several chunks of different candidate counts (and so of different natural widths)
    assert_same_result(fast_search(sq, parents, offsets, 0.5, beam, top_k, chunk=5), dense)


def test_fast_beam_search_answers_do_not_depend_on_the_chunk():
    parents, offsets = random_tree([6, 30, 120, 500], seed=3, shuffle=True)
    sq = _random_sqdists(17, seed=3, offsets=offsets)
    whole = fast_search(sq, parents, offsets, 0.2, 10, 5)
    for chunk in (1, 4):
        parts = fast_search(sq, parents, offsets, 0.2, 10, 5, chunk=chunk)
        assert torch.equal(parts.paths, whole.paths) and torch.equal(parts.scores, whole.scores)
        assert torch.equal(parts.level_probs, whole.level_probs)


# ------------------------------------------------------------------------- temperatures of reported probabilities
TEMPERATURES = [0.5, 2.0, 1.0, 3.0]


@pytest.mark.parametrize("search", SEARCHES)
def test_temperatures_change_reported_probabilities_only(search):
    parents, offsets = random_tree([4, 9, 20, 60], seed=5)
    sq = _random_sqdists(19, seed=5, offsets=offsets)
    plain = SEARCHES[search](sq, parents, offsets, 0.5, 3, 3)
    hot = SEARCHES[search](sq, parents, offsets, 0.5, 3, 3, temperatures=TEMPERATURES)
    assert torch.equal(hot.paths, plain.paths) and torch.equal(hot.scores, plain.scores)
    assert torch.equal(hot.level_probs[..., 2], plain.level_probs[..., 2])          # T = 1: bit for bit
    at_one = SEARCHES[search](sq, parents, offsets, 0.5, 3, 3, temperatures=[1.0] * 4)
    assert torch.equal(at_one.level_probs, plain.level_probs)
    # T = 3 at the cities: p is the softmax at tau * 3, so the log-ratio of any two cities reported in a row shrinks
    # by exactly 3 (finite, and a visible change, up to 0.4 here)
    found = plain.paths[..., 3] >= 0
    log_plain, log_hot = plain.level_probs[..., 3].double().log(), hot.level_probs[..., 3].double().log()
    assert torch.isfinite(log_hot[found]).all()
    assert float((hot.level_probs[..., 3] - plain.level_probs[..., 3])[found].abs().max()) > 0.05
    rows = [(row, found[row].nonzero().flatten()) for row in range(found.shape[0]) if int(found[row].sum()) >= 2]
    assert rows
    for row, k in rows:
        torch.testing.assert_close(log_hot[row, k] - log_hot[row, k[0]],
                                   (log_plain[row, k] - log_plain[row, k[0]]) / TEMPERATURES[3], atol=1e-5, rtol=0)


@pytest.mark.parametrize("search", SEARCHES)
def test_reported_probability_is_the_softmax_at_tau_times_t_among_the_candidates(search):
    """A beam covering the tree: level l's candidates are the whole level, so p_l = softmax(-d^2 / (tau T_l))."""
    sq = _random_sqdists(4, 7)
    result = SEARCHES[search](sq, _tree(), OFFSETS, 0.5, beam=100, top_k=1, temperatures=TEMPERATURES)
    for row in range(4):
        for level, t in enumerate(TEMPERATURES):
            expected = torch.softmax(-sq[level][row].double() / (0.5 * t), 0)
            local = int(result.paths[row, 0, level]) - OFFSETS[level]
            assert float(result.level_probs[row, 0, level]) == pytest.approx(float(expected[local]), abs=1e-6)


@pytest.mark.parametrize("tree", ["pruned", "shuffled", "bushy"])
def test_fast_beam_search_with_temperatures_equals_the_dense_reference(tree):
    sizes, shuffle = TREES[tree]
    parents, offsets = random_tree(sizes, seed=11, shuffle=shuffle)
    sq = _random_sqdists(23, seed=11, offsets=offsets)
    dense = dense_search(sq, parents, offsets, 0.5, 4, 3, temperatures=TEMPERATURES)
    assert_same_result(fast_search(sq, parents, offsets, 0.5, 4, 3, chunk=5, temperatures=TEMPERATURES), dense)


def test_flat_search_reports_each_ancestor_at_its_level_temperature():
    sq = _random_sqdists(5, 8)
    plain = flat_search(sq, _tree(), OFFSETS, tau=0.5, top_k=3)
    hot = flat_search(sq, _tree(), OFFSETS, tau=0.5, top_k=3, temperatures=TEMPERATURES)
    assert torch.equal(hot.paths, plain.paths) and torch.equal(hot.scores, plain.scores)
    for level, t in enumerate(TEMPERATURES):
        expected = torch.softmax(-sq[level].double() / (0.5 * t), 1)
        local = hot.paths[..., level] - OFFSETS[level]
        torch.testing.assert_close(hot.level_probs[..., level].double(), expected.gather(1, local), atol=1e-6,
                                   rtol=0)


@pytest.mark.parametrize("bad", [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0], [1.0, float("nan"), 1.0, 1.0]])
def test_temperatures_must_be_four_positive_numbers(bad):
    with pytest.raises(ValueError, match="temperatures"):
        flat_search(_random_sqdists(2, 0), _tree(), OFFSETS, tau=0.5, top_k=5, temperatures=bad)


def test_no_queries_give_empty_results():
    result = fast_search([torch.zeros(0, n) for n in (2, 3, 4, 6)], _tree(), OFFSETS, 0.5, 10, 5)
    assert result.paths.shape == (0, 5, 4) and result.scores.shape == (0, 5)


# ---------------------------------------------------------------------------------------------- geometries
def _ball_points(n, dim, radius, seed):
    """n points uniform in direction with norms uniform in [0, radius): (n, dim) float32."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
    return (direction * radius * torch.rand(n, 1, generator=gen, dtype=torch.float64)).float()


def _exact_sqdists(points, entities, c):
    """float64 reference (B, E): Poincare d^2 = ((2/sqrt(c)) arsinh(sqrt(c|x-y|^2/((1-c|x|^2)(1-c|y|^2)))))^2,
    or |x-y|^2 (c None), from the float32 inputs."""
    x, y = points.double().unsqueeze(1), entities.double().unsqueeze(0)
    diff_sq = (x - y).square().sum(-1)
    if c is None:
        return diff_sq
    denominator = (1 - c * x.square().sum(-1)) * (1 - c * y.square().sum(-1))
    return (2 / math.sqrt(c) * torch.asinh((c * diff_sq / denominator).sqrt())).square()


@pytest.mark.parametrize("c", [1.0, 0.5, None], ids=["poincare-c1", "poincare-c0.5", "euclidean"])
def test_entity_distances_match_the_exact_distance(c):
    radius = 0.99 / math.sqrt(c) if c else 3.0
    entities, points = _ball_points(300, 16, radius, 0), _ball_points(7, 16, radius, 1)
    entities[5] = points[2]  # a coincident pair: distance exactly 0
    distances = EntityDistances(entities, c=c)
    exact = _exact_sqdists(points, entities, c)
    rows = torch.arange(7).repeat_interleave(300)
    ids = torch.arange(300).repeat(7)
    pairs = distances.pair_sqdist(points, rows, ids).double().reshape(7, 300)
    torch.testing.assert_close(pairs, exact, rtol=1e-6, atol=1e-12)
    assert pairs[2, 5] == 0
    torch.testing.assert_close(distances.level_sqdist(points, 10, 50).double(), exact[:, 10:50], rtol=3e-5,
                               atol=1e-6)


@pytest.mark.parametrize("c", [1.0, 2.0, None], ids=["poincare-c1", "poincare-c2", "euclidean"])
@pytest.mark.parametrize("beam", [1, 10])
def test_fast_beam_search_equals_the_dense_reference_in_both_geometries(c, beam):
    parents, offsets = random_tree([5, 20, 60, 200], seed=7, shuffle=True)
    radius = 0.9 / math.sqrt(c) if c else 1.5
    entities, points = _ball_points(offsets[-1], 8, radius, 2), _ball_points(19, 8, radius, 3)
    exact = _exact_sqdists(points, entities, c).float()
    dense = dense_search([exact[:, offsets[l]:offsets[l + 1]] for l in range(4)], parents, offsets, 1.0, beam, 5)
    fast = beam_search(points, EntityDistances(entities, c=c), child_index(parents, offsets), 1.0, beam=beam,
                       top_k=5, chunk=8)
    assert_same_result(fast, dense)


# ---------------------------------------------------------------------------------------------- child index
def test_child_index_lists_every_entitys_children_whatever_the_order():
    for shuffle in (False, True):
        parents, offsets = random_tree([4, 9, 20, 60], seed=1, shuffle=shuffle)
        index = child_index(parents, offsets)
        assert index.contiguous == (not shuffle)
        for level in range(1, 4):
            for parent in range(offsets[level - 1], offsets[level]):
                local = parent - offsets[level - 1]
                start, count = int(index.starts[level][local]), int(index.counts[level][local])
                listed = sorted(index.order[level][start:start + count].tolist())
                expected = [e for e in range(offsets[level], offsets[level + 1]) if int(parents[e]) == parent]
                assert listed == expected


def test_child_index_rejects_a_parent_outside_the_level_above():
    parents = torch.tensor(PARENTS)
    parents[6] = 0  # a subregion whose parent is a country
    with pytest.raises(InputError, match="entity 6 .level 2. has parent 0"):
        child_index(parents, OFFSETS)
