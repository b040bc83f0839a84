"""mlx-glm-image-train's side before the loop: the settings table (every field a flag and a config key, a flag over
the file, each bad value one line), the two data formats and every bad record by its line, the order of the
batches, the output folder rule, and --dry-run's plan (its trainable parameters counted here from the checkpoint's
own weight shapes), with no model weight read."""

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from mlx_glm_image import loading
from mlx_glm_image.train import command
from mlx_glm_image.train.config import FIELDS, TrainingConfig, flag
from mlx_glm_image.train.data import DataOrder, Example


def image(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(width * height)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def jsonl(folder: Path, *records) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return folder


@pytest.fixture
def data(tmp_path) -> Path:
    """The recipe's format: two text-to-image examples of two sizes."""
    image(tmp_path / "data/images/a.png", 128, 96)
    image(tmp_path / "data/images/b.png", 64, 128)
    return jsonl(tmp_path / "data", {"image": "images/a.png", "prompt": "a red cat"},
                 {"image": "images/b.png", "prompt": "a big dog on the mat"})


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = command.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors (cli.Parser: one line, exit 1)
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def dry_run(capsys, model_dir, data, tmp_path, *more):
    return run(capsys, "-m", model_dir, "--data", data, "--output", tmp_path / "lora", "--resolution", 96,
               "--dry-run", *more)


def one_error(code: int, err: str) -> str:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ---- the settings ------------------------------------------------------------------------------------------------

def test_every_field_is_a_flag_and_a_config_key(tmp_path):
    """A config file holding every field with a value other than its default reads back as those values, and so
    do the flags, each field's own."""
    other = dict(model="m", data="d", output="o", target="dit", steps=7, rank=4, alpha=8.0, learning_rate=3e-4,
                 weight_decay=0.1, warmup_steps=3, max_grad_norm=0.5, batch_size=2, grad_accumulation=1, seed=9,
                 targets=["to_q", "to_k"], blocks="1:2", resolution=512, dtype="float32", quantize=4,
                 gradient_checkpointing=False, save_every=5, condition_dropout=0.1, validation_data="v",
                 validation_prompts=["a cat", "a dog"], validate_every=2, cache_dir="c", resume="o/c", dry_run=True)
    assert set(other) == set(FIELDS), "the test names every field of the table"
    for name, value in other.items():
        assert value != FIELDS[name].default, name
    (tmp_path / "run.json").write_text(json.dumps(other))
    parser = command.build_parser()
    from_file = command.settings.resolve(parser.parse_args(["--config", str(tmp_path / "run.json")]))
    assert from_file.as_json() == other
    argv = []
    for name, value in other.items():
        if isinstance(value, bool):
            argv.append(flag(name) if value else f"--no-{flag(name)[2:]}")
        else:
            argv += [flag(name), *map(str, value if isinstance(value, list) else [value])]
    assert command.settings.resolve(parser.parse_args(argv)).as_json() == other


def test_a_flag_overrides_the_file_and_the_file_the_defaults(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"data": "d", "output": "o", "rank": 8, "learning_rate": 2e-4,
                                                   "gradient_checkpointing": False}))
    args = command.build_parser().parse_args(["--config", str(tmp_path / "run.json"), "--rank", "16",
                                              "--gradient-checkpointing"])
    config = command.settings.resolve(args)
    assert (config.rank, config.learning_rate, config.gradient_checkpointing) == (16, 2e-4, True)
    assert config.alpha == FIELDS["alpha"].default and config.layers[0] == "q_proj"


@pytest.mark.parametrize("argv, said", [
    (["--rank", "0"], "--rank must be at least 1, got 0"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number"),
    (["--alpha", "inf"], "--alpha must be a finite number"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be above 0"),
    (["--weight-decay", "-1"], "--weight-decay must be at least 0"),
    (["--steps", "two"], "--steps: invalid int value"),
    (["--target", "vae"], "--target: invalid choice"),
    (["--quantize", "3"], "--quantize: invalid choice"),
    (["--seed", "-1"], "seed must be an integer from 0"),
    (["--blocks", "a:b"], "--blocks must be START:END"),
    (["--targets", "(unclosed"], "--targets '(unclosed' is not a regular expression"),
    (["--targets", "q_proj", "attn.*"], "--targets takes layer names, or one regular expression alone; got 'attn.*' among others"),
    (["--targets", "attn.*", "--blocks", "0:1"], "--blocks takes layer names in --targets, not a regular expression"),
    (["--validate-every", "5"], "--validate-every needs --validation-data"),
])
def test_a_bad_flag_is_one_line(capsys, tmp_path, argv, said):
    code, _, err = run(capsys, "--data", tmp_path, "--output", tmp_path / "o", *argv)
    assert said in one_error(code, err)


@pytest.mark.parametrize("content, said", [
    ({"rank": "32"}, "'rank' must be an integer, got the string '32'"),
    ({"rank": 2.5}, "'rank' must be an integer, got 2.5"),
    ({"dry_run": 1}, "'dry_run' must be true or false, got 1"),
    ({"learning_rate": True}, "'learning_rate' must be a number, got true"),
    ({"targets": "q_proj"}, "'targets' must be a list of text"),
    ({"target": "vae"}, "'target' must be one of ar, dit, got 'vae'"),
    ({"lora_rank": 8}, "unknown setting 'lora_rank'"),
    ([1, 2], "a JSON object of settings by name, got a list"),
    ("{not json", "is not JSON"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_key(capsys, tmp_path, content, said):
    path = tmp_path / "run.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    line = one_error(*run(capsys, "--config", path, "--data", tmp_path, "--output", tmp_path / "o")[::2])
    assert f"--config {path}" in line and said in line


def test_data_and_output_are_required(capsys):
    assert "give --data DIR" in one_error(*run(capsys, "--output", "o")[::2])


def test_help_explains_every_setting():
    proc = subprocess.run([sys.executable, "-m", "mlx_glm_image.train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for f in fields(TrainingConfig):
        assert flag(f.name) in proc.stdout
    assert "metadata.jsonl" in proc.stdout and "--lora OUTPUT" in proc.stdout


# ---- the data ----------------------------------------------------------------------------------------------------

def test_the_recipes_format(capsys, model_dir, data, tmp_path):
    code, out, err = dry_run(capsys, model_dir, data, tmp_path)
    assert code == 0, err
    assert "2 examples in 2 size(s): 64x128, 96x96" in out  # 128x96 and 64x128 at about 96 x 96 pixels, by 32s


def test_the_recipes_editing_format(capsys, model_dir, tmp_path):
    image(tmp_path / "data/src.png", 64, 64)
    image(tmp_path / "data/dst.png", 96, 96)
    folder = jsonl(tmp_path / "data", {"source": "src.png", "target": "dst.png", "prompt": "make it red"})
    code, out, err = dry_run(capsys, model_dir, folder, tmp_path)
    assert code == 0, err
    assert "1 examples in 1 size(s): 96x96" in out


def test_mflux_image_and_caption_pairs(capsys, model_dir, tmp_path):
    for name, size in (("one.png", (96, 96)), ("two.jpg", (128, 64))):
        image(tmp_path / "data" / name, *size)
        (tmp_path / "data" / name).with_suffix(".txt").write_text("a blue sky\n")
    code, out, err = dry_run(capsys, model_dir, tmp_path / "data", tmp_path)
    assert code == 0, err
    assert "2 examples in 2 size(s)" in out


def test_every_bad_record_is_one_line_with_its_line_number(capsys, model_copy, tmp_path):
    """Each bad record is named by its line, all of them at once, before any model loads; the prompt's length is
    counted as generation counts it (its context here shortened to 290 positions: a 96x96 image with its preview grid takes 266)."""
    config = model_copy / "vision_language_encoder" / "config.json"
    cfg = json.loads(config.read_text())
    cfg["text_config"]["max_position_embeddings"] = 290
    config.write_text(json.dumps(cfg))
    folder = tmp_path / "data"
    image(folder / "ok.png", 96, 96)
    image(folder / "wide.png", 512, 32)
    (folder / "broken.png").write_bytes(b"not an image")
    jsonl(folder,
          {"image": "ok.png", "prompt": "a red cat"},  # line 1: fine
          {"image": "gone.png", "prompt": "a red cat"},  # 2
          {"image": "broken.png", "prompt": "a red cat"},  # 3
          {"image": "ok.png", "prompt": "  "},  # 4
          {"image": "ok.png", "prompt": " ".join(["cat"] * 30)},  # 5: 30 words and the grids: past 290
          {"image": "wide.png", "prompt": "a red cat"},  # 6: 16:1 at about 96 x 96 is wider than 128
          {"image": "ok.png", "prompt": "a", "seed": 3},  # 7
          "{oops",  # 8
          {"image": "ok.png", "prompt": 7},  # 9
          {"source": "ok.png", "prompt": "x"})  # 10
    code, _, err = dry_run(capsys, model_copy, folder, tmp_path)
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    expected = {2: "gone.png does not exist", 3: "broken.png is not an image that can be read",
                4: "the prompt is empty", 5: "the prompt is too long", 6: "would train at",
                7: "unknown key 'seed'", 8: "not JSON", 9: "the prompt must be text", 10: "no 'target'"}
    assert len(lines) == len(expected), err
    for line, (n, said) in zip(lines, expected.items()):
        assert line.startswith(f"error: {folder / 'metadata.jsonl'} line {n}: ") and said in line, line


def test_a_caption_pair_without_its_caption(capsys, model_dir, tmp_path):
    image(tmp_path / "data/one.png", 96, 96)
    line = one_error(*dry_run(capsys, model_dir, tmp_path / "data", tmp_path)[::2])
    assert "one.png: has no caption file one.txt" in line


def test_a_resolution_past_the_model(capsys, model_dir, data, tmp_path):
    code, _, err = run(capsys, "-m", model_dir, "--data", data, "--output", tmp_path / "o", "--dry-run")
    assert "--resolution 1024: height and width must be at most 128" in one_error(code, err)


def test_the_data_order_depends_on_the_seed_and_the_epoch_alone():
    sizes = [(64, 64)] * 5 + [(96, 64)] * 3
    examples = [Example(where=str(i), image=Path(f"{i}.png"), prompt="p", height=h, width=w)
                for i, (h, w) in enumerate(sizes)]
    order = DataOrder(examples, batch_size=2, seed=5)
    assert order.per_epoch == 3 + 2
    first = order.epoch(0)
    assert sorted(i for b in first for i in b) == list(range(8))
    assert all(len({examples[i].bucket for i in b}) == 1 for b in first), "one size per batch"
    again = DataOrder(examples, batch_size=2, seed=5)
    assert [again.batch(n) for n in range(10)] == first + order.epoch(1)
    assert order.epoch(1) != first and DataOrder(examples, batch_size=2, seed=6).epoch(0) != first


# ---- the output folder -------------------------------------------------------------------------------------------

def test_an_output_holding_other_files_is_refused_unless_resumed(capsys, model_dir, data, tmp_path):
    out = tmp_path / "lora"
    (out / "checkpoints" / "step-10").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    assert "holds files this run did not make" in one_error(*dry_run(capsys, model_dir, data, tmp_path)[::2])
    code, _, err = dry_run(capsys, model_dir, data, tmp_path, "--resume", out / "checkpoints" / "step-10")
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert "is not below --output" in one_error(*dry_run(capsys, model_dir, data, tmp_path, "--resume", elsewhere)[::2])


# ---- the plan ----------------------------------------------------------------------------------------------------

def lora_parameters(model_dir: Path, rank: int, names, blocks) -> int:
    """rank x (in + out) over the AR decoder's linear layers named, read from the checkpoint's own weight
    headers."""
    total = 0
    for shard in sorted((model_dir / "vision_language_encoder").glob("*.safetensors")):
        with safe_open(str(shard), framework="numpy") as f:
            for key in f.keys():
                parts = key.split(".")
                if (key.startswith("model.language_model.layers.") and parts[-1] == "weight"
                        and parts[-2] in names and int(parts[3]) in blocks):
                    out, inp = f.get_slice(key).get_shape()
                    total += rank * (inp + out)
    return total


@pytest.mark.parametrize("more, rank, names, blocks", [
    ((), 32, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}, {0, 1}),
    (("--rank", "4", "--targets", "q_proj", "down_proj", "--blocks", "1:"), 4, {"q_proj", "down_proj"}, {1}),
    (("--rank", "8", "--targets", r".*\.self_attn\.[qv]_proj"), 8, {"q_proj", "v_proj"}, {0, 1}),
])
def test_the_plan_counts_the_adapters_parameters(capsys, model_dir, data, tmp_path, monkeypatch, more, rank, names,
                                                  blocks):
    """The trainable parameters equal the LoRA A and B of the targeted layers, counted from the weight files; and
    no weight is read: loading a model or any array file fails here."""

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run read weights")

    monkeypatch.setattr(mx, "load", refuse)
    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(loading, "load_weights", refuse)
    code, out, err = dry_run(capsys, model_dir, data, tmp_path, *more)
    assert code == 0, err
    expected = lora_parameters(model_dir, rank, names, blocks)
    assert expected > 0
    assert f"trainable  {expected:,} parameters" in out, out
    assert not (tmp_path / "lora").exists(), "a dry run writes nothing"


def test_targets_that_pick_nothing(capsys, model_dir, data, tmp_path):
    assert "--targets to_q names no linear layer" in one_error(
        *dry_run(capsys, model_dir, data, tmp_path, "--targets", "to_q")[::2])
    assert "--blocks 5: holds no block" in one_error(*dry_run(capsys, model_dir, data, tmp_path, "--blocks", "5:")[::2])


def test_the_dit_target_plans_too(capsys, model_dir, data, tmp_path):
    code, out, err = dry_run(capsys, model_dir, data, tmp_path, "--target", "dit")
    assert code == 0, err
    assert "(transformer, bfloat16)" in out and "to_q to_k to_v to_out.0" in out
