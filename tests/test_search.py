"""Beam search and flat search over a small hand-made tree, checked against exhaustive enumeration."""

import itertools

import pytest
import torch

from hierloc.search import beam_search, flat_search, local_parents

# Tree: 2 countries; 3 regions (0,0,1); 4 subregions (0,1,2,2); 6 cities (0,0,1,2,3,3)
PARENTS = [-1, -1, 0, 0, 1, 2, 3, 4, 4, 5, 5, 6, 7, 8, 8]
OFFSETS = [0, 2, 5, 9, 15]


def _tree():
    parents = torch.tensor(PARENTS)
    return parents, local_parents(parents, OFFSETS)


def _random_sqdists(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, OFFSETS[i + 1] - OFFSETS[i], generator=gen) * 4 for i in range(4)]


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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_equals_exhaustive_search(seed):
    parents, plocal = _tree()
    sq = _random_sqdists(4, seed)
    result = beam_search(sq, plocal, OFFSETS, tau=0.5, beam=100, top_k=3)
    for row in range(4):
        best, best_score = _exhaustive_best(sq, parents, 0.5, row)
        assert result.paths[row, 0].tolist() == best
        assert result.scores[row, 0].item() == pytest.approx(best_score, abs=1e-5)


def test_paths_are_consistent_with_the_tree_and_sorted():
    parents, plocal = _tree()
    sq = _random_sqdists(8, 5)
    result = beam_search(sq, plocal, OFFSETS, tau=0.3, beam=2, top_k=2)
    for row in range(8):
        assert result.scores[row, 0] >= result.scores[row, 1]
        for k in range(2):
            path = result.paths[row, k].tolist()
            for level in range(1, 4):
                assert PARENTS[path[level]] == path[level - 1]
            # the score is the sum of the logs of the reported level probabilities
            assert result.level_probs[row, k].log().sum().item() == pytest.approx(result.scores[row, k].item(),
                                                                                 abs=1e-4)


def test_beam_of_one_is_greedy():
    parents, plocal = _tree()
    sq = _random_sqdists(5, 9)
    result = beam_search(sq, plocal, OFFSETS, tau=1.0, beam=1, top_k=1)
    for row in range(5):
        node = int(sq[0][row].argmin())
        path = [node]
        for level in range(1, 4):
            children = [e for e in range(OFFSETS[level], OFFSETS[level + 1]) if PARENTS[e] == path[-1]]
            path.append(min(children, key=lambda e: float(sq[level][row, e - OFFSETS[level]])))
        assert result.paths[row, 0].tolist() == path


def test_entity_without_children_is_carried_down():
    # country 1 has region 2 with no subregion: a pruned branch
    parents = torch.tensor([-1, -1, 0, 1, 2, 4])
    offsets = [0, 2, 4, 5, 6]
    plocal = local_parents(parents, offsets)
    sq = [torch.tensor([[5.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0]]), torch.tensor([[0.0]])]
    result = beam_search(sq, plocal, offsets, tau=0.1, beam=3, top_k=2)
    assert result.paths[0, 0].tolist() == [1, 3, -1, -1]
    assert result.paths[0, 1].tolist() == [0, 2, 4, 5]


def test_flat_search_returns_nearest_city_and_its_ancestors():
    parents, _ = _tree()
    sq = _random_sqdists(6, 3)
    result = flat_search(sq, parents, OFFSETS, tau=0.5, top_k=2)
    for row in range(6):
        city = int(sq[3][row].argmin()) + OFFSETS[3]
        path = result.paths[row, 0].tolist()
        assert path[3] == city
        assert path[2] == PARENTS[city] and path[1] == PARENTS[path[2]] and path[0] == PARENTS[path[1]]
