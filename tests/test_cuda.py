"""The training loop, the masked model and the mask tools on a GPU. Skipped where there is none (as in
CI); run with `pytest tests/test_cuda.py` on a machine that has one."""

import pytest
import torch

from koff.training.pipeline import decompose
from koff.masks.oneshot import top_ffn_neurons
from koff.training import DecomposeConfig
from tiny import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("mask", ["learned", "oneshot:wanda"])
def test_a_run_on_the_gpu_gives_the_logits_the_cpu_gives(tmp_path, tokenizer, domains, mask):
    # 8 steps with the last 40% on the frozen binary mask: both gate kinds run on the device.
    config = DecomposeConfig(model="tiny", out=str(tmp_path / "run"), block_len=32, batch_size=3, kv_slots=4, steps=8,
                             sparsity=0.3, mask=mask, final_fraction=0.4, eval=True, eval_max_blocks=2, device="cuda")
    dec, summary = decompose(config, base=tiny_model("llama"), tokenizer=tokenizer, domains=domains)
    assert summary["eval"]["mask+memories"]["domains"]
    model = dec.model.eval()
    assert model.device.type == "cuda"
    ids = torch.stack([d.val[0] for d in domains])
    names = [d.name for d in domains]
    with torch.no_grad():
        on_gpu = model(input_ids=ids.cuda(), domains=names).cpu()
        mixed_on_gpu = model(input_ids=ids.cuda(), domains=[names[0], None, names[2]]).cpu()
        model.cpu()  # cached gates and LoRA factors must follow the model
        on_cpu = model(input_ids=ids, domains=names)
        mixed_on_cpu = model(input_ids=ids, domains=[names[0], None, names[2]])
    torch.testing.assert_close(mixed_on_gpu, mixed_on_cpu, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(on_gpu, on_cpu, atol=2e-4, rtol=1e-4)


def test_top_neurons_of_importance_on_the_gpu_are_the_ones_on_the_cpu():
    # `koff analyze --device cuda` crashed here: importance on the GPU, layer offsets on the CPU.
    importance = [torch.rand(48, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    on_cpu = top_ffn_neurons(importance, 7)
    assert top_ffn_neurons([s.cuda() for s in importance], 7) == on_cpu


def test_the_massive_neuron_is_held_open_on_the_gpu(tmp_path, tokenizer, domains):
    # --keep-outliers ranks Wanda importance measured on the device: the same crash as above.
    base = tiny_model("llama")
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight[:, 7] *= 1000.0
    config = DecomposeConfig(model="tiny", out=str(tmp_path / "run"), block_len=32, batch_size=3, kv_slots=4, steps=4,
                             sparsity=0.3, init_from="none", keep_outliers=1, device="cuda")
    dec, _ = decompose(config, base=base, tokenizer=tokenizer, domains=domains)
    assert int(dec.learned_mask.pinned.sum()) == 1 and dec.final_mask().ffn[1][7]
