import copy
import math

import pytest
import torch

from koff.masks import (
    BinaryMask, HardConcreteGates, LearnedMask, UnitCosts, oneshot_mask, select_uniform_units, select_units, unit_importance,
)
from koff.masks.hard_concrete import BETA, LIMIT_LEFT, LIMIT_RIGHT, LOG_ALPHA_MAX, LOG_ALPHA_MIN
from koff.model import KoffModel
from koff.models import decoder_layout
from tiny import tiny_model


def test_hard_concrete_gates():
    gates = HardConcreteGates(1000, init_log_alpha=5.0)
    assert torch.equal(gates.deterministic(), torch.ones(1000))  # gates start fully open
    sample = gates.sample()
    assert sample.min() >= 0 and sample.max() <= 1
    expected = torch.sigmoid(torch.tensor(5.0 - BETA * math.log(-LIMIT_LEFT / LIMIT_RIGHT)))
    assert torch.allclose(gates.prob_nonzero(), expected.expand(1000))
    with torch.no_grad():
        gates.log_alpha[:2] = torch.tensor([-50.0, 50.0])
    gates.clamp_()
    assert gates.log_alpha[0].item() == pytest.approx(LOG_ALPHA_MIN)
    assert gates.log_alpha[1].item() == pytest.approx(LOG_ALPHA_MAX)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_unit_costs_add_up_to_block_parameters(kind):
    model = tiny_model(kind)
    layout = decoder_layout(model)
    costs = UnitCosts.of(model, layout)
    norms = sum(p.numel() for parts in layout.layers for n, p in parts.layer.named_parameters() if "norm" in n)
    units = sum(n * c for n, c in zip(costs.ffn_units, costs.ffn_cost)) + sum(
        n * c for n, c in zip(costs.attn_units, costs.attn_cost)
    )
    assert units + norms == costs.block_params
    assert costs.ffn_cost[0] == 3 * 64


def random_scores():
    """Unit costs of a 3-layer tiny Llama and a random score for each of its units."""
    model = tiny_model("llama", layers=3)
    costs = UnitCosts.of(model, decoder_layout(model))
    torch.manual_seed(0)
    return costs, [torch.randn(n) for n in costs.ffn_units], [torch.randn(n) for n in costs.attn_units]


def test_select_units_meets_target_within_one_unit():
    costs, ffn, attn = random_scores()
    for target in (0.05, 0.12, 0.3):
        mask = select_units(ffn, attn, costs, target)
        assert abs(mask.sparsity(costs) - target) * costs.block_params <= max(costs.attn_cost)
        assert all(m.sum() >= 1 for m in mask.ffn + mask.attn)  # no layer is emptied
    ffn_only = select_units(ffn, None, costs, 0.1)
    assert all(m.all() for m in ffn_only.attn)
    assert abs(ffn_only.sparsity(costs) - 0.1) * costs.block_params <= costs.ffn_cost[0] / 2


def test_uniform_selection_keeps_one_width_in_every_layer_and_meets_the_target():
    costs, ffn, attn = random_scores()
    for target in (0.05, 0.12, 0.3):
        mask = select_uniform_units(ffn, attn, costs, target)
        assert len({int(m.sum()) for m in mask.ffn}) == 1 and len({int(m.sum()) for m in mask.attn}) == 1
        assert abs(mask.sparsity(costs) - target) * costs.block_params <= len(costs.ffn_units) * costs.ffn_cost[0] / 2
        for scores, keep in zip(ffn + attn, mask.ffn + mask.attn):  # each layer removes its own lowest scores
            if (~keep).any():
                assert scores[~keep].max() <= scores[keep].min()
            assert keep.sum() >= 1


def smollm2_costs(layers: int = 4) -> UnitCosts:
    """SmolLM2-135M's unit costs (FFN 1536, 3 KV groups of 3 query heads of 64), for ``layers`` layers."""
    ffn_cost, attn_cost = 3 * 576, 8 * 64 * 576
    block = 1536 * ffn_cost + 3 * attn_cost + 2 * 576
    return UnitCosts((1536,) * layers, (3,) * layers, (ffn_cost,) * layers, (attn_cost,) * layers, block * layers,
                     block * layers + 2 * 49152 * 576)


def test_aligned_selection_keeps_multiples_of_the_unit_and_meets_the_target():
    costs = smollm2_costs()
    torch.manual_seed(0)
    ffn, attn = [torch.randn(n) for n in costs.ffn_units], [torch.randn(n) for n in costs.attn_units]
    ffn[2][7] = math.inf  # held open
    chunk = 64 * costs.ffn_cost[0]
    for target in (0.05, 0.12, 0.25):
        mask = select_units(ffn, attn, costs, target, ffn_align=64)
        assert all(int(m.sum()) % 64 == 0 for m in mask.ffn) and mask.ffn[2][7]
        assert abs(mask.sparsity(costs) - target) * costs.block_params <= max(chunk, costs.attn_cost[0]) / 2
        for scores, keep in zip(ffn, mask.ffn):  # each layer's lowest scores go
            if (~keep).any():
                assert scores[~keep].max() <= scores[keep].min()
        uniform = select_uniform_units(ffn, attn, costs, target, ffn_align=64)
        assert len({int(m.sum()) for m in uniform.ffn}) == 1 and int(uniform.ffn[0].sum()) % 64 == 0
        assert abs(uniform.sparsity(costs) - target) * costs.block_params <= len(costs.ffn_units) * chunk / 2
    odd = UnitCosts((100,), (2,), (10,), (1000,), 3000, 3000)  # not a multiple: the remainder goes first
    assert [int(select_units([torch.randn(100)], None, odd, t, ffn_align=64).ffn[0].sum()) for t in (0.05, 0.2)] == [100, 64]


def test_select_units_removes_lowest_scores_first():
    model = tiny_model("llama")
    costs = UnitCosts.of(model, decoder_layout(model))
    ffn = [torch.arange(n, dtype=torch.float) for n in costs.ffn_units]
    mask = select_units(ffn, None, costs, 10 * costs.ffn_cost[0] / costs.block_params)
    removed = [(~m).nonzero().flatten().tolist() for m in mask.ffn]
    assert removed == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]


def test_binary_mask_round_trip(tmp_path):
    model = tiny_model("qwen2")
    costs = UnitCosts.of(model, decoder_layout(model))
    mask = select_units([torch.randn(n) for n in costs.ffn_units], [torch.randn(n) for n in costs.attn_units], costs, 0.2)
    mask.save(tmp_path / "mask.safetensors", costs)
    again = BinaryMask.load(tmp_path / "mask.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(mask.ffn + mask.attn, again.ffn + again.attn))
    assert again.sparsity(costs) == mask.sparsity(costs)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gates_act_like_removed_weights(kind):
    """Gating FFN neuron j equals zeroing down_proj column j; gating KV group g equals zeroing its o_proj columns."""
    model = tiny_model(kind)
    reference = copy.deepcopy(model)
    koff = KoffModel(model)
    costs = koff.costs
    mask = BinaryMask.dense(costs)
    mask.ffn[0][[3, 7]] = False
    mask.attn[1][0] = False
    koff.set_mask(mask)
    with torch.no_grad():
        reference.model.layers[0].mlp.down_proj.weight[:, [3, 7]] = 0
        group_width = 2 * 16  # n_rep query heads x head_dim
        reference.model.layers[1].self_attn.o_proj.weight[:, :group_width] = 0
    ids = torch.randint(0, 300, (2, 10))
    assert torch.allclose(koff(ids), reference(ids).logits, atol=1e-5)


def test_learned_mask_expected_sparsity_and_binarize():
    model = tiny_model("llama")
    costs = UnitCosts.of(model, decoder_layout(model))
    mask = LearnedMask(costs)
    assert mask.expected_sparsity().item() < 0.01  # gates open at log_alpha = 5
    with torch.no_grad():
        for g in mask.ffn:
            g.log_alpha[:48] = LOG_ALPHA_MIN
    final = mask.binarize(0.05)
    assert all(not m[48:].logical_not().any() for m in final.ffn)  # only low log_alpha units go
    assert abs(final.sparsity(costs) - 0.05) * costs.block_params <= costs.ffn_cost[0]


def test_held_open_gates_are_never_sampled_cost_nothing_and_are_always_kept():
    model = tiny_model("llama")
    costs = UnitCosts.of(model, decoder_layout(model))
    mask = LearnedMask(costs)
    with torch.no_grad():
        mask.ffn[1].log_alpha.fill_(LOG_ALPHA_MIN)  # every neuron of layer 1 on its way out
    before = mask.expected_removed_params()
    mask.pin_open_([(1, 7), (0, 3)])
    freed = costs.ffn_cost[1] * (1 - mask.ffn[1].prob_nonzero()[7]) + costs.ffn_cost[0] * (1 - mask.ffn[0].prob_nonzero()[3])
    assert (before - mask.expected_removed_params()).item() == pytest.approx(freed.item(), abs=1e-2)  # float32 sums
    mask.train()
    for _ in range(5):
        ffn, _ = mask.gates()
        assert ffn[1][7] == 1 and ffn[0][3] == 1 and ffn[1][:7].max() < 1
    ffn[1].sum().backward()
    grad = mask.ffn[1].log_alpha.grad
    assert grad[7] == 0 and grad.abs().sum() > 0  # learning cannot move a held-open gate
    mask.project_(0.2)
    assert mask.expected_sparsity().item() == pytest.approx(0.2, abs=1e-5)
    final = mask.binarize(0.3)
    assert final.ffn[1].nonzero().flatten().tolist() == [7] and final.ffn[0][3]  # layer 1 keeps only the pinned one
    assert abs(final.sparsity(costs) - 0.3) * costs.block_params <= max(costs.attn_cost)
    assert mask.binarize(0.3, uniform=True).ffn[1][7]
    for bad in ([(2, 0)], [(0, 96)], [(-1, 0)]):
        with pytest.raises(ValueError, match="to hold open"):
            mask.pin_open_(bad)
    with pytest.raises(ValueError, match="only FFN neurons"):
        LearnedMask(costs, prune_ffn=False).pin_open_([(0, 0)])


def test_select_units_never_removes_a_unit_scored_infinite():
    costs, ffn, attn = random_scores()
    ffn[0] = torch.full_like(ffn[0], math.inf)
    mask = select_units(ffn, attn, costs, 0.6)
    assert mask.ffn[0].all() and not mask.ffn[1].all()


def test_oneshot_importance_finds_dead_units():
    model = tiny_model("llama")
    layout = decoder_layout(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 5] = 0  # neuron 5 of layer 1 does nothing
    batches = [torch.randint(0, 300, (2, 16)) for _ in range(2)]
    ffn, attn = unit_importance(model, layout, batches, "wanda")
    assert [t.shape[0] for t in ffn] == [96, 96] and [t.shape[0] for t in attn] == [2, 2]
    assert ffn[1][5] == 0 and ffn[1].argmin() == 5
    costs = UnitCosts.of(model, layout)
    mask = oneshot_mask(model, layout, costs, batches, 0.1, "activation")
    assert abs(mask.sparsity(costs) - 0.1) * costs.block_params <= max(costs.attn_cost)
    with pytest.raises(ValueError, match="unknown importance"):
        unit_importance(model, layout, batches, "nope")


def test_learned_mask_computes_all_layers_at_once_and_projects_without_reading_the_device():
    model = tiny_model("llama", layers=4)
    costs = UnitCosts.of(model, decoder_layout(model))
    mask = LearnedMask(costs)
    with torch.no_grad():
        for g in mask._all():
            g.log_alpha.uniform_(-3, 6)
    mask.eval()
    ffn, attn = mask.gates()  # per-layer views of one computation, equal to each layer's own gates
    for gates, group in ((ffn, mask.ffn), (attn, mask.attn)):
        for values, g in zip(gates, group):
            torch.testing.assert_close(values, g.deterministic(mask.offset))
    with torch.profiler.profile() as prof:
        mask.clamp_()
        mask.project_(0.2)
        mask.train()
        mask.gates()
        mask.expected_sparsity()
    assert not [e for e in prof.events() if e.name == "aten::_local_scalar_dense"]  # no .item(): no host sync
    assert mask.expected_sparsity().item() == pytest.approx(0.2, abs=1e-5)
    reference = sum(c * (1 - g.prob_nonzero(mask.offset)).sum() for g, c in zip(mask.ffn, costs.ffn_cost)) + \
        sum(c * (1 - g.prob_nonzero(mask.offset)).sum() for g, c in zip(mask.attn, costs.attn_cost))
    torch.testing.assert_close(mask.expected_removed_params(), reference)


def test_a_mask_value_is_parsed_once_into_its_type(tmp_path):
    from koff.config import DecomposeConfig
    from koff.errors import UserInputError
    from koff.masks.spec import FileMaskSpec, LearnedMaskSpec, NoMaskSpec, OneShotMaskSpec, parse_mask_spec

    assert parse_mask_spec("learned") == LearnedMaskSpec() and parse_mask_spec("none") == NoMaskSpec()
    assert parse_mask_spec("oneshot:wanda") == OneShotMaskSpec("wanda")
    (tmp_path / "run").mkdir()
    spec = parse_mask_spec(f"file:{tmp_path / 'run'}")
    assert isinstance(spec, FileMaskSpec) and spec.file == str(tmp_path / "run" / "mask.safetensors")
    for spec in ("learned", "none", "oneshot:activation", f"file:{tmp_path}/m.safetensors"):
        assert parse_mask_spec(spec).text == spec  # what config.yaml keeps round-trips
    for bad in ("oneshot", "oneshot:magic", "file:", "learned:x", "pruned"):
        with pytest.raises(UserInputError, match="mask|importance"):
            parse_mask_spec(bad)
    config = DecomposeConfig(mask="oneshot:wanda", domain=["a=b"])
    assert config.mask_spec == OneShotMaskSpec("wanda") and "mask_spec" not in config.to_dict()
    assert not NoMaskSpec.prunes and LearnedMaskSpec.learned and not OneShotMaskSpec.learned
