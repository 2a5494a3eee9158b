"""Distillation: losses, config, make_student, and DistillationTrainer inside the real Trainer."""

import logging

import pytest
import torch
from helpers import tiny_model, token_windows
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from hfcompress import DistillationConfig, DistillationTrainer, MovementPruningConfig, PruningCallback, make_student
from hfcompress.checkpoint import FORMAT_VERSION, manifest_of
from hfcompress.distillation import attention_loss, hidden_state_loss, soft_target_loss
from hfcompress.distillation.trainer import PROJECTIONS_FILE


def classifier(layers=4, hidden=32, seed=0, labels=3, attn="eager"):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        num_labels=labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32,
    )  # fmt: skip
    config._attn_implementation = attn
    return BertForSequenceClassification(config)


def task(n=64):
    from datasets import Dataset

    ids = torch.randint(1, 64, (n, 10), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 1] % 3).tolist()})


def args(tmp_path, steps=8, **extra):
    base = dict(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=2,
        save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=0,
    )  # fmt: skip
    return TrainingArguments(**{**base, **extra})


def test_losses():
    logits = torch.randn(4, 7)
    assert float(soft_target_loss(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(4, 7)
    # T^2 scaling: at high temperature the scaled loss tends to the logit-matching limit, not to zero
    assert float(soft_target_loss(other, logits, 100.0)) > 0.1 * float(soft_target_loss(other, logits, 1.0))
    with pytest.raises(ValueError, match="different label sets or vocabularies \\(5 vs 7"):
        soft_target_loss(torch.randn(4, 5), logits, 1.0)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    changed = s.clone()
    changed[0, 3:] += 100  # padding: must not count
    for kind in ("mse", "cosine"):
        assert hidden_state_loss(s, t, kind, mask) == pytest.approx(float(hidden_state_loss(changed, t, kind, mask)))
    maps = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    assert float(attention_loss(maps, maps)) == pytest.approx(0.0, abs=1e-6)


def test_config_validates_and_round_trips():
    config = DistillationConfig(temperature=2.0, alpha_kd=0.5, hidden_states=[(2, 1), (4, 2)], hidden_loss="cosine")
    assert config.alpha_task == 0.5 and config.weights() == {"task": 0.5, "kd": 0.5, "hidden": 1.0}
    assert DistillationConfig.from_dict(config.to_dict()) == config
    for bad, message in [
        (dict(temperature=0), "`temperature` must be > 0, got 0"),
        (dict(alpha_kd=0, alpha_task=0), "weights sum to zero"),
        (dict(alpha_kd=-1), "`alpha_kd` must be a number >= 0"),
        (dict(hidden_states=[(1, 2, 3)]), "index pairs"),
        (dict(hidden_loss="l1"), "`hidden_loss`"),
    ]:
        with pytest.raises(ValueError, match=message):
            DistillationConfig(**bad)


def test_make_student_copies_the_chosen_blocks_and_reloads(tmp_path):
    from transformers import AutoModelForSequenceClassification

    teacher = classifier(layers=4).eval()
    student = make_student(teacher, num_layers=2)
    assert student.config.num_hidden_layers == 2 and manifest_of(student).student_layers == [0, 3]
    # a plain transformers model: the manifest stays out of quantization_config
    assert getattr(student.config, "quantization_config", None) is None
    assert student.config.hfcompress == {"method": "distillation", "version": FORMAT_VERSION, "student_layers": [0, 3]}
    for s, t in ((0, 0), (1, 3)):
        a = student.bert.encoder.layer[s].output.dense.weight
        assert torch.equal(a, teacher.bert.encoder.layer[t].output.dense.weight)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert len(teacher.bert.encoder.layer) == 4  # the teacher is untouched
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    x = torch.randint(1, 64, (2, 10))
    torch.testing.assert_close(reloaded(x).logits, student(x).logits)
    teacher.requires_grad_(False)  # frozen, as DistillationTrainer leaves it: students still train
    narrow = make_student(teacher, layers=[1, 2], ffn=0.5)
    assert all(p.requires_grad for p in narrow.parameters())
    assert narrow.config.intermediate_size == 32
    with pytest.raises(ValueError, match="distinct block indices in \\[0, 4\\), got \\[1, 7\\]"):
        make_student(teacher, layers=[1, 7])
    with pytest.raises(ValueError, match="between 1 and the teacher's 4 layers, got 9"):
        make_student(teacher, num_layers=9)


def test_classification_distillation_logs_every_term_and_leaves_the_teacher_alone(tmp_path, caplog):
    teacher = classifier(layers=4, seed=1)
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = classifier(layers=2, seed=5)  # not a copy of the teacher: there is something to learn
    config = DistillationConfig(temperature=2.0, alpha_kd=0.5, hidden_states=[(2, 1), (4, 2)], attentions=[(3, 1)])
    with caplog.at_level(logging.WARNING):
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, distillation=config, args=args(tmp_path, steps=16),
            train_dataset=task(), eval_dataset=task(16),
        )  # fmt: skip
    assert "training mode" in caplog.text and not teacher.training
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all({"loss_task", "loss_kd", "loss_hidden", "loss_attention"} <= h.keys() for h in logged)
    assert logged[-1]["loss_hidden"] < 0.7 * logged[0]["loss_hidden"]  # the student moves towards the teacher
    assert "eval_loss" in trainer.evaluate()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_causal_lm_masks_padding_out_of_every_term(tmp_path):
    teacher = tiny_model("llama")
    student = make_student(teacher, num_layers=1)
    config = DistillationConfig(alpha_kd=0.7, hidden_states=[(2, 1)])
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, distillation=config, args=args(tmp_path), train_dataset=task()
    )
    ids = token_windows(2, 12)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, 8:] = 0  # right padding
    labels = ids.masked_fill(attention_mask == 0, -100)
    other = ids.clone()
    other[0, 8:] = 5  # different tokens where the padding is
    student.train()
    losses = [
        trainer.compute_loss(student, {"input_ids": x, "attention_mask": attention_mask, "labels": labels})
        for x in (ids, other)
    ]
    torch.testing.assert_close(losses[0], losses[1])


def test_projections_train_and_are_not_part_of_the_saved_student(tmp_path):
    from safetensors.torch import load_file

    teacher = classifier(layers=4, hidden=32)
    student = classifier(layers=2, hidden=16, seed=3)
    config = DistillationConfig(hidden_states=[(4, 2)])
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, distillation=config, args=args(tmp_path), train_dataset=task()
    )
    initial = trainer.projections[0].weight.detach().clone()
    trainer.train()
    projection = trainer.projections[0].weight
    assert projection.shape == (32, 16) and not torch.equal(projection, initial)
    trainer.save_model(str(tmp_path / "student"))
    saved = load_file(tmp_path / "student" / "model.safetensors")
    assert set(saved) == set(student.state_dict())  # the student alone
    assert torch.equal(load_file(tmp_path / "student" / PROJECTIONS_FILE)["0.weight"], projection.detach())


def test_resume_from_checkpoint(tmp_path):
    def run(out, **extra):
        teacher = classifier(layers=4, seed=1)
        student = make_student(teacher, num_layers=2)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, distillation=DistillationConfig(hidden_states=[(2, 1)]),
            args=args(out, **extra), train_dataset=task(),
        )  # fmt: skip
        return trainer, student

    full, full_student = run(tmp_path / "full")
    full.train()
    first, _ = run(tmp_path / "run", save_strategy="steps", save_steps=4)
    first.train()
    resumed, resumed_student = run(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    for (name, a), b in zip(full_student.state_dict().items(), resumed_student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_bad_pairs_fail_clearly(tmp_path):
    teacher = classifier(layers=4)
    cases = [
        (classifier(layers=2, labels=5), DistillationConfig(), "label sets differ"),
        (
            classifier(layers=2),
            DistillationConfig(hidden_states=[(5, 1)]),
            "out of range: the teacher has hidden states 0..4",
        ),
        (classifier(layers=2), DistillationConfig(attentions=[(0, 2)]), "the student 0..1"),
        (classifier(layers=2, attn="sdpa"), DistillationConfig(attentions=[(0, 1)]), "attn_implementation='eager'"),
    ]
    for student, config, message in cases:
        with pytest.raises(ValueError, match=message):
            DistillationTrainer(model=student, teacher_model=teacher, distillation=config, args=args(tmp_path))
    llama, other = tiny_model("llama"), tiny_model("llama")
    other.resize_token_embeddings(300)
    with pytest.raises(ValueError, match="vocabularies differ \\(256 vs 300 tokens\\)"):
        DistillationTrainer(model=other, teacher_model=llama, args=args(tmp_path))


def test_movement_pruning_inside_distillation(tmp_path):
    teacher = classifier(layers=4, seed=1)
    student = make_student(teacher, num_layers=2)
    pruning = MovementPruningConfig(final_sparsity=0.5, warmup_steps=1, cooldown_steps=2)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, distillation=DistillationConfig(alpha_kd=0.9), args=args(tmp_path),
        train_dataset=task(), callbacks=[PruningCallback(pruning)],
    )  # fmt: skip
    trainer.train()
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert last["sparsity"] == pytest.approx(0.5, abs=1e-3) and "loss_kd" in last


@pytest.mark.parametrize("bits", [8, 4])
def test_a_bitsandbytes_teacher_saves_memory_and_still_teaches(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from helpers import save_tiny_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    save_tiny_model(tmp_path / "teacher")
    quantization = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(load_in_4bit=True)
    teacher = AutoModelForCausalLM.from_pretrained(
        tmp_path / "teacher", quantization_config=quantization, device_map="cpu"
    )
    assert "bitsandbytes" in type(teacher.model.layers[0].mlp.down_proj).__module__
    student = make_student(AutoModelForCausalLM.from_pretrained(tmp_path / "teacher"), num_layers=1)
    windows = token_windows(8, 16)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, distillation=DistillationConfig(alpha_kd=0.5),
        args=args(tmp_path / "run", steps=2, per_device_train_batch_size=4, logging_steps=1),
        train_dataset=[{"input_ids": w, "labels": w} for w in windows],
    )  # fmt: skip
    trainer.train()
    assert all(h["loss_kd"] > 0 for h in trainer.state.log_history if "loss" in h)
