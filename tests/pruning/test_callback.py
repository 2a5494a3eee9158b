"""PruningCallback inside the real Trainer: schedule, masks in the forward pass, gradient accumulation, mixed
precision, evaluation, checkpoint resume, and the plain model `finalize_pruning` leaves."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from hfcompress import MagnitudePruningConfig, MovementPruningConfig, PruningCallback, finalize_pruning
from hfcompress.pruning import Pruner

STEPS = 12


def tiny_classifier(seed: int = 0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def task(n: int = 96):
    from datasets import Dataset

    ids = torch.randint(1, 64, (n, 10), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 1] % 3).tolist()})


def trainer_for(model, config, tmp_path, **overrides):
    args = dict(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=0,
    )  # fmt: skip
    args.update(overrides)
    return Trainer(
        model=model, args=TrainingArguments(**args), train_dataset=task(), eval_dataset=task(32),
        callbacks=[PruningCallback(config)],
    )  # fmt: skip


def schedule(**extra):
    return dict(final_sparsity=0.75, warmup_steps=2, cooldown_steps=4, **extra)


def masked_fraction(model) -> dict[str, float]:
    pruner = Pruner.from_model(model)
    return {name: float((layer.weight == 0).float().mean()) for name, (layer, _) in pruner.masks.items()}


@pytest.mark.parametrize("method", ["topk", "sigmoid"])
def test_movement_follows_the_schedule_and_masks_the_forward_pass(tmp_path, method):
    model = tiny_classifier()
    trainer = trainer_for(model, MovementPruningConfig(method=method, **schedule()), tmp_path)
    assert len(Pruner.from_model(model).masks) == 12  # q, k, v, o, ffn in, ffn out of 2 blocks
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["sparsity_target"] for h in logged[:2]] == [0.0, 0.0]
    targets = [h["sparsity_target"] for h in logged]
    assert targets == sorted(targets) and targets[-1] == 0.75
    assert logged[-1]["sparsity"] == pytest.approx(0.75, abs=1e-3)
    fractions = masked_fraction(model)
    if method == "topk":  # local: every matrix at the target
        assert all(f == pytest.approx(0.75, abs=0.01) for f in fractions.values())
    else:  # soft movement ranks globally: the layers differ
        assert max(fractions.values()) - min(fractions.values()) > 0.05
    scores = [mask.scores for _, mask in Pruner.from_model(model).masks.values()]
    assert all(s.abs().sum() > 0 for s in scores), "the scores never received a gradient"


def test_magnitude_rows_gradient_accumulation_and_evaluation(tmp_path):
    model = tiny_classifier()
    config = MagnitudePruningConfig(granularity="row", **schedule())
    trainer = trainer_for(model, config, tmp_path, gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=6)
    trainer.train()
    assert trainer.state.global_step == STEPS
    assert any("eval_loss" in h for h in trainer.state.log_history)
    layer = model.bert.encoder.layer[0].intermediate.dense
    rows_zero = (layer.weight == 0).all(dim=1)
    assert int(rows_zero.sum()) == 48  # whole output neurons pruned: 75% of 64
    assert not (layer.weight[~rows_zero] == 0).any()


def test_bf16_mixed_precision_on_cpu(tmp_path):
    model = tiny_classifier()
    try:
        trainer = trainer_for(model, MovementPruningConfig(**schedule()), tmp_path, bf16=True)
    except ValueError as e:  # a CPU without bf16 support
        pytest.skip(str(e))
    trainer.train()
    assert trainer.state.log_history[-2]["sparsity"] == pytest.approx(0.75, abs=1e-3)


def test_resume_from_checkpoint_restores_scores_masks_and_schedule(tmp_path):
    config = MovementPruningConfig(**schedule())
    full_model = tiny_classifier()
    trainer_for(full_model, config, tmp_path / "full").train()

    first = tiny_classifier()
    trainer_for(first, config, tmp_path / "run", save_strategy="steps", save_steps=6).train()
    resumed_model = tiny_classifier()
    resumed = trainer_for(resumed_model, config, tmp_path / "run", save_strategy="no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert resumed.state.global_step == STEPS
    full, again = Pruner.from_model(full_model), Pruner.from_model(resumed_model)
    for name, (_, mask) in full.masks.items():
        other = again.masks[name][1]
        assert torch.equal(mask.mask, other.mask), name
        torch.testing.assert_close(mask.scores, other.scores, rtol=1e-4, atol=1e-6)


def test_resuming_with_a_different_config_fails(tmp_path):
    trainer_for(
        tiny_classifier(), MovementPruningConfig(**schedule()), tmp_path, save_strategy="steps", save_steps=6
    ).train()
    other = trainer_for(tiny_classifier(), MovementPruningConfig(**schedule(method="sigmoid")), tmp_path)
    with pytest.raises(ValueError, match="resuming with a different pruning config"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))


def test_bad_targets_fail_when_the_trainer_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"`target_modules` \['nothing_like_this'\] match no linear layer"):
        trainer_for(tiny_classifier(), MagnitudePruningConfig(target_modules=["nothing_like_this"]), tmp_path)
    with pytest.raises(ValueError, match="block 5x5 does not divide a 32x32"):
        trainer_for(tiny_classifier(), MagnitudePruningConfig(granularity="5x5"), tmp_path)
    with pytest.raises(TypeError, match="needs a PruningConfig"):
        PruningCallback("magnitude")


def test_finalize_leaves_a_plain_model_that_reloads(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = tiny_classifier()
    trainer_for(model, MovementPruningConfig(**schedule()), tmp_path).train()
    model.eval()
    x = torch.randint(1, 64, (4, 10))
    expected = model(x).logits
    finalize_pruning(model, remove_structure=False)
    assert not any("parametrizations" in k or "scores" in k for k in model.state_dict())
    torch.testing.assert_close(model(x).logits, expected)
    assert float((model.bert.encoder.layer[1].output.dense.weight == 0).float().mean()) == pytest.approx(0.75, abs=0.01)
    model.save_pretrained(tmp_path / "final")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    torch.testing.assert_close(reloaded(x).logits, expected)
    with pytest.raises(ValueError, match="carries no pruning masks"):
        finalize_pruning(model)


class _Probe(torch.nn.Module):
    """Two linear layers over 32 features of which only the first two decide the label."""

    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(32, 64)
        self.out = torch.nn.Linear(64, 2)

    def forward(self, x, labels=None):
        logits = self.out(torch.relu(self.hidden(x)))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("config", [MovementPruningConfig(method="topk"), MovementPruningConfig(method="sigmoid"),
                                    MagnitudePruningConfig()], ids=["hard", "soft", "magnitude"])  # fmt: skip
def test_pruned_training_keeps_the_weights_that_matter(tmp_path, config):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=g)
    labels = (x[:, 0] + x[:, 1] > 0).long()
    data = [{"x": a, "labels": b} for a, b in zip(x, labels, strict=True)]
    torch.manual_seed(0)
    model = _Probe()
    config.final_sparsity, config.warmup_steps, config.cooldown_steps = 0.95, 30, 60
    config.target_modules = ["hidden"]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=300, per_device_train_batch_size=32, learning_rate=1e-2,
        save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=0, logging_steps=50,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[PruningCallback(config)]).train()
    finalize_pruning(model, remove_structure=False)
    kept = (model.hidden.weight != 0).float()
    assert kept.mean() == pytest.approx(0.05, abs=0.01)
    assert kept[:, :2].mean() > 5 * kept[:, 2:].mean()  # the informative inputs keep far more of their weights
    with torch.no_grad():
        accuracy = (model(x)["logits"].argmax(-1) == labels).float().mean()
    assert accuracy > 0.9
