"""Mixture-of-experts models: fused 3-D experts held as one linear per expert compute exactly what the fused
module computes, every technique compresses each expert, each expert is calibrated on its own tokens (or on all
of them), and the compressed experts save and reload."""

import copy
import json

import pytest
import torch
from helpers import MOE_ARCHITECTURES, tiny_model, tiny_tokenizer, token_windows
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.core.capture import capture_block_inputs
from hfcompress.core.experts import ExpertLinears, fuse_dense_experts, routing_all_tokens, unfuse_experts
from hfcompress.core.hessian import Hessian
from hfcompress.core.streaming import streaming_obstacle
from hfcompress.core.trace import trace_block
from hfcompress.data import calibration_batches
from hfcompress.quantization.gptq import gptq_quantize
from hfcompress.quantization.gptq_blocks import quantize_group
from hfcompress.quantization.grid import rtn_quantize
from hfcompress.quantization.modules import QuantLinear
from hfcompress.quantization.save import save_quantized


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", list(MOE_ARCHITECTURES))
def test_per_expert_linears_compute_what_the_fused_experts_compute(arch):
    model = tiny_model(arch)
    for p in model.parameters():  # weights large enough that the routing and every expert matter
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(p.numel()))
    ids = token_windows(2, 16)
    reference, state = _logits(model, ids), copy.deepcopy(model.state_dict())
    names = unfuse_experts(model)
    assert names and all(isinstance(model.get_submodule(n), ExpertLinears) for n in names)
    assert not any(p.dim() == 3 for p in model.parameters())
    if arch == "gpt_oss":  # its eager experts add the bias after the matmul; a linear adds it inside
        torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=1e-5)
    else:
        assert torch.equal(_logits(model, ids), reference)
    assert fuse_dense_experts(model) == names
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_routing_every_token_through_every_expert_keeps_the_outputs():
    model = tiny_model("mixtral")
    unfuse_experts(model)
    ids = token_windows(2, 16)
    calls = {}
    experts = model.model.layers[0].mlp.experts
    for e, linear in enumerate(experts.gate_up_proj):
        linear.register_forward_hook(lambda m, args, out, e=e: calls.__setitem__(e, args[0].shape[0]))
    routed = _logits(model, ids)
    assert sum(calls.values()) == 2 * 32  # each token to its two experts
    with routing_all_tokens(model):
        everything = _logits(model, ids)
    assert experts.route_all is False  # back as it was
    assert set(calls.values()) == {32}  # every expert saw every token
    torch.testing.assert_close(everything, routed, rtol=0, atol=1e-6)


def test_each_projection_of_all_experts_is_calibrated_in_one_stage():
    model = tiny_model("mixtral")
    unfuse_experts(model)
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, [token_windows(2, 16)])
    targets = [n for n, m in block.named_modules(prefix="model.layers.0") if isinstance(m, torch.nn.Linear)]
    trace = trace_block(block, "model.layers.0", targets, inputs[0])
    stages = [[name for g in stage for name in trace.groups[g]] for stage in trace.stages]
    assert stages == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        [f"mlp.experts.gate_up_proj.{e}" for e in range(8)],
        [f"mlp.experts.down_proj.{e}" for e in range(8)],
    ]


@pytest.mark.parametrize("all_tokens", [False, True])
def test_each_expert_is_calibrated_on_its_tokens_or_on_all_of_them(all_tokens):
    ids = token_windows(8, 32)
    keep = ["lm_head", r"re:.*self_attn.*", r"re:.*layers\.1\..*"]  # the experts of block 0 see float inputs
    config = hfcompress.GPTQConfig(
        bits=4, group_size=32, dataset=ids, modules_to_not_convert=keep, calibrate_all_experts=all_tokens
    )
    model = hfcompress.quantize(tiny_model("mixtral"), config)

    reference = tiny_model("mixtral")
    unfuse_experts(reference)
    experts = reference.model.layers[0].mlp.experts
    hessians = [Hessian(64, "cpu") for _ in range(8)]
    for e, linear in enumerate(experts.gate_up_proj):
        linear.register_forward_pre_hook(lambda m, args, e=e: hessians[e].add(args[0]))
    with routing_all_tokens(reference, all_tokens):
        for batch in calibration_batches(ids, config.num_samples, config.batch_size):
            reference(input_ids=batch)
    tokens = model.hfcompress_coverage["experts"]["model.layers.0.mlp.experts"]["tokens"]
    assert tokens == [h.count for h in hessians]
    assert sum(tokens) == (8 * 8 * 32 if all_tokens else 2 * 8 * 32)
    for e in range(8):
        linear = copy.deepcopy(experts.gate_up_proj[e])
        expected = quantize_group(["x"], {"x": linear}, hessians[e].full(), config, torch.float16)["x"]
        assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj[e].codes(), expected.codes)


def test_an_expert_no_token_reached_is_rounded_to_nearest():
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    quantized, _ = gptq_quantize(weight, torch.zeros(64, 64), bits=4, group_size=32)
    assert torch.equal(quantized.codes, rtn_quantize(weight, 4, 32, sym=False).codes)


def test_a_few_tokens_are_reported(caplog):
    ids = token_windows(2, 8)  # 16 tokens, 2 experts each: every expert sees fewer tokens than its 64 inputs
    config = hfcompress.GPTQConfig(bits=4, group_size=32, dataset=ids, calibrate_all_experts=False)
    with caplog.at_level("WARNING", logger="hfcompress.core.experts"):
        model = hfcompress.quantize(tiny_model("mixtral"), config)
    few = model.hfcompress_coverage["experts"]["model.layers.0.mlp.experts"]["few"]
    assert few == list(range(8)) and "saw fewer calibration tokens" in caplog.text


def test_experts_quantized_to_4_bits_shrink_the_checkpoint_and_reload(tmp_path):
    """Tiny Mixtral whose experts hold most weights (hidden 128, 8 experts of 256): 0.95x of float32 when the
    experts were skipped; the issue's target is at most 0.2x."""
    config = MOE_ARCHITECTURES["mixtral"]().config
    config.update(dict(hidden_size=128, intermediate_size=256))
    torch.manual_seed(0)
    model = type(tiny_model("mixtral"))(config).eval()
    model.save_pretrained(tmp_path / "float")
    hfcompress.quantize(model, hfcompress.RTNConfig(bits=4, group_size=128))
    coverage = model.hfcompress_coverage
    assert coverage["compressed"]["QuantLinear"]["layers"] == 2 * (4 + 2 * 8)
    assert set(coverage["left_out"]) == {"embedding", "output embedding (lm_head)", "router (kept in full precision)"}
    model.save_pretrained(tmp_path / "q")
    size = {k: (tmp_path / k / "model.safetensors").stat().st_size for k in ("float", "q")}
    assert size["q"] <= 0.2 * size["float"]

    ids = token_windows(2, 16)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.model.layers[1].mlp.experts.down_proj[7], QuantLinear)
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
    reloaded.save_pretrained(tmp_path / "again")  # a loaded model saves under the same names
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again"), ids), _logits(model, ids))


def test_routers_stay_in_full_precision():
    model = hfcompress.quantize(tiny_model("qwen2_moe"), hfcompress.RTNConfig(bits=4, group_size=32))
    block = model.model.layers[0].mlp
    assert type(block.shared_expert_gate) is torch.nn.Linear and not isinstance(block.gate, QuantLinear)
    assert isinstance(block.shared_expert.down_proj, QuantLinear)
    assert model.hfcompress_coverage["left_out"]["router (kept in full precision)"]["tensors"] == 4


@pytest.mark.parametrize("storage", ["dense", "bitmask"])
def test_pruned_experts_are_fused_again_when_dense_and_bitmask_stored_otherwise(storage, tmp_path):
    from hfcompress.core.registry import compress
    from hfcompress.pruning import OneShotPruningConfig
    from hfcompress.pruning.sparse import SparseLinear, store_sparse

    model = compress(tiny_model("mixtral"), OneShotPruningConfig(method="wanda", sparsity=0.5, dataset=token_windows()))
    fused = model.model.layers[0].mlp.experts
    assert not isinstance(fused, ExpertLinears) and (fused.down_proj == 0).float().mean() == 0.5
    store_sparse(model, storage=storage)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, ExpertLinears) == (storage == "bitmask")
    if storage == "bitmask":
        assert isinstance(experts.down_proj[0], SparseLinear)
    ids = token_windows(2, 16)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))


def test_factorized_experts_reload(tmp_path):
    from hfcompress.core.registry import compress
    from hfcompress.lowrank import FactorizedLinear, LowRankConfig

    model = compress(tiny_model("olmoe"), LowRankConfig(method="svd", rank=8))
    assert isinstance(model.model.layers[1].mlp.experts.down_proj[3], FactorizedLinear)
    model.save_pretrained(tmp_path)
    ids = token_windows(2, 16)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), _logits(model, ids))


@pytest.mark.parametrize(
    ("arch", "config", "message"),
    [
        # GPT-OSS's checkpoints hold the fused (transposed) tensors: no per-expert names to write
        ("gpt_oss", hfcompress.RTNConfig(bits=4, group_size=32, sym=True), r"GptOssForCausalLM has no per-expert"),
        ("mixtral", hfcompress.RTNConfig(bits=4, group_size=32, sym=True, layer_bits={"re:.*down_proj.*": 8}),
         r"experts are quantized on several grids \(w4 g32, w8 g32\); transformers applies one config group"),
    ],
    ids=["fused-checkpoint", "mixed"],
)  # fmt: skip
def test_compressed_tensors_export_of_experts_it_cannot_hold_is_refused(tmp_path, arch, config, message):
    model = hfcompress.quantize(tiny_model(arch), config)
    with pytest.raises(ValueError, match=message + r".*--format hfcompress"):
        save_quantized(model, tmp_path / "out", format="compressed-tensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_the_command_quantizes_experts_and_records_their_tokens(tmp_path, offload):
    from hfcompress.commands.cli import main

    folder = tmp_path / "mixtral"
    tiny_model("mixtral").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    assert streaming_obstacle(folder) is None  # its experts are read one linear at a time (`test_streamed_experts`)
    ids = tmp_path / "calib.txt"
    ids.write_text(" ".join(["def class return import"] * 400))
    out = tmp_path / "out"
    args = ["quantize", "gptq", str(folder), str(out), "--group-size", "32", "--dataset", str(ids), "--seq-len", "32"]
    assert main([*args, "--num-samples", "4", "--offload", offload, "-q"]) == 0
    record = json.loads((out / "hfcompress_record.json").read_text())
    assert record["steps"][0]["config"].get("offload", "none") == offload
    experts = record["steps"][0]["config"]["coverage"]["experts"]["model.layers.0.mlp.experts"]
    assert experts["tokens"] == [4 * 32] * 8  # every token through every expert, GPTQ's default
    assert "Step 1 compressed 40 QuantLinear layers" in (out / "README.md").read_text()
