from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from koff.config import parse_sampling
from koff.training.sampler import DomainSampler


def corpus(sizes: dict[str, int]) -> list[SimpleNamespace]:
    """Fake domains whose block ``i`` is filled with ``i``: enough for the sampler."""
    return [SimpleNamespace(name=name, train=torch.arange(n)[:, None].repeat(1, 3)) for name, n in sizes.items()]


SIZES = {"big": 400, "mid": 100, "small": 4}


def draw(sampler: DomainSampler, batches: int, batch_size: int = 5) -> list[tuple[list[str], torch.Tensor]]:
    return [(names, blocks) for blocks, names in (sampler.next_batch(batch_size) for _ in range(batches))]


def test_balanced_sampling_takes_each_domain_in_turn():
    (names, _), = draw(DomainSampler(corpus(SIZES), seed=0), 1, batch_size=6)
    assert names == ["big", "mid", "small"] * 2
    assert DomainSampler(corpus(SIZES), seed=0).shares == [1 / 3] * 3


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_size_sampling_draws_domains_in_proportion_to_size_to_the_alpha(alpha):
    sampler = DomainSampler(corpus(SIZES), seed=0, size_alpha=alpha)
    counts = Counter(n for names, _ in draw(sampler, 800) for n in names)
    weights = {name: n**alpha for name, n in SIZES.items()}
    assert sampler.shares == pytest.approx([w / sum(weights.values()) for w in weights.values()])
    for name, weight in weights.items():
        expected = 4000 * weight / sum(weights.values())
        assert abs(counts[name] - expected) < 4 * expected**0.5 + 1, (name, counts)


def test_size_sampling_resumes_exactly_from_its_state():
    straight = DomainSampler(corpus(SIZES), seed=3, size_alpha=0.5)
    draw(straight, 7)
    resumed = DomainSampler(corpus(SIZES), seed=3, size_alpha=0.5)
    resumed.load_state_dict(straight.state_dict())
    for (names_a, blocks_a), (names_b, blocks_b) in zip(draw(straight, 20), draw(resumed, 20)):
        assert names_a == names_b
        assert torch.equal(blocks_a, blocks_b)


def test_small_domains_repeat_less_under_size_sampling():
    def small_epochs(sampler: DomainSampler) -> int:
        draw(sampler, 200)
        return sampler.state.epoch[list(SIZES).index("small")]

    assert small_epochs(DomainSampler(corpus(SIZES), seed=0, size_alpha=0.5)) < small_epochs(DomainSampler(corpus(SIZES), seed=0)) / 3


def test_sampling_spec_parses():
    assert parse_sampling("balanced") is None
    assert parse_sampling("size:0.5") == 0.5
    for bad in ("size:", "size:nan", "size:inf", "uniform"):
        with pytest.raises(ValueError, match="--sampling must be"):
            parse_sampling(bad)
