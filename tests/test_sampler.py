from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from koff.config import DecomposeConfig, SamplingSpec, parse_sampling
from koff.errors import UserInputError
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
    sampler = DomainSampler(corpus(SIZES), seed=0, sampling=SamplingSpec(size_alpha=alpha))
    counts = Counter(n for names, _ in draw(sampler, 800) for n in names)
    weights = {name: n**alpha for name, n in SIZES.items()}
    assert sampler.shares == pytest.approx([w / sum(weights.values()) for w in weights.values()])
    for name, weight in weights.items():
        expected = 4000 * weight / sum(weights.values())
        assert abs(counts[name] - expected) < 4 * expected**0.5 + 1, (name, counts)


def test_size_sampling_resumes_exactly_from_its_state():
    straight = DomainSampler(corpus(SIZES), seed=3, sampling=SamplingSpec(size_alpha=0.5))
    draw(straight, 7)
    resumed = DomainSampler(corpus(SIZES), seed=3, sampling=SamplingSpec(size_alpha=0.5))
    resumed.load_state_dict(straight.state_dict())
    for (names_a, blocks_a), (names_b, blocks_b) in zip(draw(straight, 20), draw(resumed, 20)):
        assert names_a == names_b
        assert torch.equal(blocks_a, blocks_b)


def test_small_domains_repeat_less_under_size_sampling():
    def small_epochs(sampler: DomainSampler) -> int:
        draw(sampler, 200)
        return sampler.state.epoch[list(SIZES).index("small")]

    assert small_epochs(DomainSampler(corpus(SIZES), seed=0, sampling=SamplingSpec(size_alpha=0.5))) < small_epochs(DomainSampler(corpus(SIZES), seed=0)) / 3


def test_sampling_spec_parses():
    assert parse_sampling("balanced") == SamplingSpec()
    assert parse_sampling("size:0.5") == SamplingSpec(size_alpha=0.5)
    assert parse_sampling("balanced:small=3, mid=2") == SamplingSpec(weights=(("small", 3), ("mid", 2)))
    for bad in ("size:", "size:nan", "size:inf", "uniform", "balanced:small", "balanced:small=0", "balanced:small=1.5",
                "balanced:=2", "balanced:small=2,", "balanced:small=2,small=3"):
        with pytest.raises(ValueError, match="--sampling must be"):
            parse_sampling(bad)


def test_weighted_balanced_sampling_gives_a_domain_more_turns_in_a_fixed_cycle():
    sampler = DomainSampler(corpus(SIZES), seed=0, sampling=parse_sampling("balanced:small=2"))
    assert sampler.shares == [0.25, 0.25, 0.5]
    names = [n for batch, _ in draw(sampler, 10, batch_size=4) for n in batch]
    assert Counter(names) == {"big": 10, "mid": 10, "small": 20}
    assert all(set(names[i:i + 4]) == set(SIZES) for i in range(0, 40, 4))  # every cycle holds every domain
    resumed = DomainSampler(corpus(SIZES), seed=0, sampling=parse_sampling("balanced:small=2"))
    resumed.load_state_dict(sampler.state_dict())
    assert [names for names, _ in draw(resumed, 3)] == [names for names, _ in draw(sampler, 3)]


def test_a_weight_must_name_a_domain():
    with pytest.raises(UserInputError, match="weighs pyhton, not among the domains"):
        DecomposeConfig(domain=["python=bundled:code/python"], sampling="balanced:pyhton=2").validate()
    DecomposeConfig(domain=["python=bundled:code/python"], sampling="balanced:python=2").validate()
