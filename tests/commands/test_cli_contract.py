"""The command lines earlier issues and the README promised still parse to the same settings after the
commands became generated from the technique registry (flags from config fields)."""

import shlex

import pytest

from hfcompress.commands.cli import build_parser

WRITER = "--overwrite --dtype float16 --eval-dataset val.txt --eval-seq-len 256 --eval-max-windows 5 --push-to-hub u/m --private -q"

CASES = [
    (
        "quantize gptq M O --bits 4 --group-size 128 --act-order --sym --dataset c.txt --num-samples 128 --seq-len 2048 "
        "--format compressed-tensors --no-true-sequential --damp-percent 0.02 --block-size 64 --clip-search",
        dict(
            bits=4,
            group_size=128,
            act_order=True,
            sym=True,
            dataset="c.txt",
            num_samples=128,
            seq_len=2048,
            format="compressed-tensors",
            true_sequential=False,
            damp_percent=0.02,
            block_size=64,
            clip_search=True,
        ),
    ),
    ("quantize gptq M O --no-act-order --no-static-groups --dataset c.txt", dict(act_order=False, static_groups=False)),
    (
        "quantize rtn M O --bits 3 --group-size -1 --scale-dtype bfloat16 --modules-to-not-convert lm_head down_proj",
        dict(bits=3, group_size=-1, scale_dtype="bfloat16", modules_to_not_convert=["lm_head", "down_proj"]),
    ),
    (
        "quantize bnb M O --bits 8 --quant-type fp4 --double-quant --compute-dtype bfloat16 --skip-modules lm_head,score",
        dict(
            bits=8,
            quant_type="fp4",
            double_quant=True,
            compute_dtype="bfloat16",
            modules_to_not_convert=["lm_head", "score"],
        ),
    ),
    ("quantize kmeans M O --bits 3 --dataset c.txt --iters 5", dict(bits=3, dataset="c.txt", iters=5)),
    ("quantize vq M O --bits 2 --dim 4 --groups 2", dict(bits=2, dim=4, groups=2)),
    (
        "factorize M O --param-ratio 0.8 --method asvd --allocation uniform --dataset c.txt --num-samples 64 --seq-len 512 "
        "--alpha 0.3 --no-sequential --sensitivity-samples 2 --sensitivity-cache s.json",
        dict(
            param_ratio=0.8,
            method="asvd",
            allocation="uniform",
            dataset="c.txt",
            num_samples=64,
            seq_len=512,
            alpha=0.3,
            sequential=False,
            sensitivity_samples=2,
            sensitivity_cache="s.json",
        ),
    ),
    ("factorize M O --rank 8 --method svd", dict(rank=8, method="svd")),
    ("merge-lora M A O --rank exact", dict(model="M", adapter="A", output="O", rank="exact")),
    (
        "prune oneshot M O --method sparsegpt --sparsity 0.5 --pattern 2:4 --dataset c.txt --storage dense --blocksize 64",
        dict(method="sparsegpt", sparsity=0.5, pattern="2:4", dataset="c.txt", storage="dense", block_size=64),
    ),
    ("prune oneshot M O --method magnitude", dict(method="magnitude", storage="bitmask", dataset=None)),
    (
        "prune structured M O --heads 0.5 --ffn 0.25 --dataset c.txt --task sequence-classification --num-samples 8",
        dict(heads=0.5, ffn=0.25, dataset="c.txt", task="sequence-classification", num_samples=8),
    ),
    (
        "distill O --teacher T --student-layers 3 --dataset d.txt --task causal-lm --hidden-states 2:1,5:2 "
        "--temperature 3 --alpha-kd 0.7 --alpha-task 0.3 --hidden-loss cosine --max-steps 10 --learning-rate 0.001 "
        "--batch-size 2 --gradient-accumulation-steps 2 --seed 1 --cpu --layer-strategy first --max-windows 4 --seq-len 64",
        dict(
            output="O",
            teacher="T",
            student_layers=3,
            dataset="d.txt",
            hidden_states="2:1,5:2",
            temperature=3.0,
            alpha_kd=0.7,
            alpha_task=0.3,
            hidden_loss="cosine",
            max_steps=10,
            learning_rate=0.001,
            batch_size=2,
            gradient_accumulation_steps=2,
            seed=1,
            cpu=True,
            layer_strategy="first",
            max_windows=4,
            seq_len=64,
        ),
    ),
    (
        "distill O --teacher T --student S --teacher-bits 4 --dataset d.jsonl --task sequence-classification",
        dict(student="S", teacher_bits=4, task="sequence-classification"),
    ),
    ("recipe R.yaml M O --resume --overwrite --dtype bfloat16", dict(recipe="R.yaml", resume=True, dtype="bfloat16")),
    (
        "search M O --budget bits=3.5 --dataset c.txt --eval-dataset v.txt --techniques gptq,prune --resume",
        dict(budget="bits=3.5", techniques="gptq,prune", resume=True),
    ),
    ("evaluate M --dataset v.txt --seq-len 512 --max-windows 4 --json", dict(seq_len=512, max_windows=4, json=True)),
    ("card O --repo-id u/m", dict(output="O", repo_id="u/m")),
    ("push O u/m --private --revision main --commit-message hi", dict(repo_id="u/m", private=True, revision="main")),
]


@pytest.mark.parametrize("line, expected", CASES, ids=[c[0].split(" M")[0].split(" O")[0] for c in CASES])
def test_promised_command_lines_parse_to_the_same_settings(line, expected):
    args = build_parser().parse_args(shlex.split(line))
    for key, value in expected.items():
        assert getattr(args, key) == value, key


@pytest.mark.parametrize(
    "command",
    ["quantize gptq M O", "quantize rtn M O", "quantize kmeans M O", "factorize M O --rank 2", "prune oneshot M O",
     "prune structured M O --heads 0.5", "merge-lora M A O", "distill O --teacher T --student-layers 1 --dataset d"],
)  # fmt: skip
def test_every_writing_command_takes_the_shared_options(command):
    extra = " --dataset c.txt" if command == "quantize gptq M O" else ""
    args = build_parser().parse_args(shlex.split(command + extra + " " + WRITER))
    assert (args.overwrite, args.dtype, args.eval_dataset, args.eval_seq_len, args.eval_max_windows) == (
        True, "float16", "val.txt", 256, 5,
    )  # fmt: skip
    assert (args.push_to_hub, args.private, args.quiet) == ("u/m", True, True)


def test_gptq_still_requires_its_calibration_data(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "gptq", "M", "O"])
    assert "--dataset" in capsys.readouterr().err
