"""The training loop on the tiny pipeline (images of 96x96 and 128x64 pixels, fp32): a run ends with the adapter in --output, loadable
by --lora; it equals the steps made by hand with the tested pieces (train/ar.py, train/dit.py, train/optim.py, which
test_train_ar.py and test_train_dit.py hold equal to torch + PEFT); a run stopped by a signal and resumed, or resumed
from any checkpoint, ends bit-identical to one never stopped; a step whose loss is not finite is skipped and counted;
the frozen encodings are made once (a second run loads no encoder); two processes under mlx.launch equal one.
"""

import json
import shutil
import signal
import subprocess
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from commands import LAUNCH, ROOT, argv, cli_ok, ring
from PIL import Image

from mlx_glm_image import lora, metadata
from mlx_glm_image.train import command, trainer
from mlx_glm_image.train import optim as train_optim
from mlx_glm_image.train.config import TrainingConfig

SETTINGS = dict(resolution=96, rank=4, alpha=8, warmup_steps=1, learning_rate=1e-3, dtype="float32", seed=3,
                grad_accumulation=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Four text-to-image examples at two training sizes (96x96 and 128x64 at --resolution 96)."""
    root = tmp_path_factory.mktemp("train-data")
    (root / "images").mkdir()
    records = []
    for i, (w, h) in enumerate([(64, 64), (96, 64), (64, 64), (96, 64)]):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"images/{i}.png")
        records.append({"image": f"images/{i}.png", "prompt": f'a sign that says "OPEN {i}"'})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("encodings")


def config(model_dir, data, cache, output, **more) -> TrainingConfig:
    return TrainingConfig(model=str(model_dir), data=str(data), output=str(output), cache_dir=str(cache),
                          **{**SETTINGS, **more})


def adapter(folder: Path) -> dict:
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else \
        "pytorch_lora_weights.safetensors"
    return {k: np.array(v) for k, v in mx.load(str(folder / name)).items()}


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def ar_run(model_dir, data, cache, tmp_path_factory) -> Path:
    """5 steps of the AR target, a checkpoint every 2."""
    out = tmp_path_factory.mktemp("ar-run") / "lora"
    result = trainer.train(config(model_dir, data, cache, out, steps=5, save_every=2))
    assert result.adapter == out and result.step == 5 and not result.stopped
    return out


def test_a_run_leaves_the_adapter_its_checkpoints_and_its_log(ar_run, model_dir):
    files = sorted(p.name for p in ar_run.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "checkpoints", "loss.jsonl", "loss.png"]
    assert sorted(p.name for p in (ar_run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    records = [json.loads(line) for line in (ar_run / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    assert records[0]["learning_rate"] == 0.0  # transformers' warm-up starts at 0
    trained = lora.read(str(ar_run))
    assert trained.model is None and len(trained.layers) == 12  # 6 layers x 2 blocks
    assert any(np.abs(np.array(b)).max() > 0 for _, b, _ in trained.layers.values())  # B moved from its zeros


def test_the_command_makes_images_with_the_trained_adapter(ar_run, model_dir, tmp_path):
    out = tmp_path / "with.png"
    args = ["-m", model_dir, "--prompt", 'a sign that says "OPEN 1"', "--height", 64, "--width", 64, "--steps", 2,
            "--seed", 1, "--dtype", "float32", "--top-k", 1, "--quiet"]
    cli_ok(*args, "--lora", ar_run, "--output", out, timeout=300)
    recorded = metadata.read(out)["lora"]
    assert [r["source_given"] for r in recorded] == [str(ar_run)] and recorded[0]["model"] == "vision_language_encoder"


def by_hand(model_dir, data, cache, steps: int, **more):
    """The run's steps made with the pieces alone: the same encodings, initialisation, order and keys."""
    c = config(model_dir, data, cache, "/nonexistent", steps=steps, gradient_checkpointing=False, **more)
    t = trainer.Trainer(c)
    t.prepare()
    model = t.model
    opt = train_optim.adamw(learning_rate=c.learning_rate, weight_decay=c.weight_decay,
                            warmup_steps=c.warmup_steps, steps=c.steps)
    loss_and_grad = nn.value_and_grad(model, t.target.loss)
    for n in range(steps):
        acc = train_optim.Accumulator()
        for j in range(c.grad_accumulation):
            m = n * c.grad_accumulation + j
            batch = [t.train_set[i] for i in t.plan.order.batch(m)]
            _, grads = loss_and_grad(model, t.target.prepare(batch, trainer.micro_batch_key(c.seed, m),
                                                            c.condition_dropout))
            acc.add(grads)
        train_optim.apply_step(model, opt, acc.mean(), c.max_grad_norm)
        mx.eval(model.trainable_parameters(), opt.state)
    return {f"base_model.model.{p}.lora_{n}.weight": np.array(w)
            for p, (a, b) in lora.trained(model).items() for n, w in (("A", a), ("B", b))}


def test_the_loop_is_the_tested_steps(ar_run, model_dir, data, cache):
    ours, hand = adapter(ar_run), by_hand(model_dir, data, cache, 5)
    for k in hand:
        np.testing.assert_allclose(ours[k], hand[k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("step", [2, 4])
def test_resumed_from_a_checkpoint_ends_bit_identical(ar_run, model_dir, data, cache, tmp_path, step):
    out = tmp_path / "lora"
    shutil.copytree(ar_run / "checkpoints" / f"step-{step:06d}", out / "checkpoints" / f"step-{step:06d}")
    result = trainer.train(config(model_dir, data, cache, out, steps=5, save_every=2,
                                  resume=str(out / "checkpoints" / f"step-{step:06d}")))
    assert result.step == 5
    assert_identical(adapter(out), adapter(ar_run))
    assert [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()] == \
        list(range(step + 1, 6))


def stop_after(monkeypatch, step: int, times: int = 1):
    """A SIGINT (``times`` of them) right after optimizer step ``step``, as a user's Ctrl-C between steps."""
    take = trainer.Trainer.take_step

    def take_then_signal(self):
        out = take(self)
        if self.step == step:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(trainer.Trainer, "take_step", take_then_signal)


def run(capsys, *args):
    code = command.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def cli_args(model_dir, data, cache, out, steps=5):
    flat = [x for k, v in SETTINGS.items() for x in (f"--{k.replace('_', '-')}", v)]
    return ["-m", model_dir, "--data", data, "--output", out, "--cache-dir", cache, "--steps", steps,
            "--save-every", 2, *flat]


def test_ctrl_c_writes_a_checkpoint_and_resume_ends_bit_identical(ar_run, model_dir, data, cache, tmp_path,
                                                                  monkeypatch, capsys):
    out = tmp_path / "lora"
    stop_after(monkeypatch, 3)
    code, _, err = run(capsys, *cli_args(model_dir, data, cache, out))
    assert code == 130, err
    assert "stopped after step 3" in err and "--resume" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert not (out / "adapter_model.safetensors").exists()  # the adapter is written when the run is done
    monkeypatch.undo()
    code, _, err = run(capsys, *cli_args(model_dir, data, cache, out), "--resume", out)  # the latest checkpoint
    assert code == 0, err
    assert_identical(adapter(out), adapter(ar_run))


def test_a_second_ctrl_c_stops_at_once_and_leaves_the_last_checkpoint(model_dir, data, cache, tmp_path,
                                                                       monkeypatch, capsys):
    out = tmp_path / "lora"
    stop_after(monkeypatch, 3, times=2)
    code, _, err = run(capsys, *cli_args(model_dir, data, cache, out))
    assert code == 130 and "interrupted; the last checkpoint is" in err and "step-000002" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert not list(out.rglob("*.partial"))


@pytest.mark.parametrize("change, said", [({"rank": 8}, "--rank 4, this one says 8"),
                                          ({"learning_rate": 1e-4}, "--learning-rate 0.001"),
                                          ({"steps": 2}, "--steps 5")])
def test_a_resumed_run_keeps_its_settings(ar_run, model_dir, data, cache, tmp_path, change, said):
    out = tmp_path / "lora"
    shutil.copytree(ar_run / "checkpoints", out / "checkpoints")
    with pytest.raises(ValueError, match=said.replace("-", r"\-").replace(".", r"\.")):
        trainer.train(config(model_dir, data, cache, out, **{"steps": 5, **change}, resume=str(out)))


def test_a_step_whose_loss_is_not_finite_is_skipped_and_counted(model_dir, data, cache, tmp_path, monkeypatch):
    loss = trainer.ArTarget.loss
    calls = []

    def nan_on_third(self, model, batch):
        calls.append(1)
        value = loss(self, model, batch)
        return value * mx.array(float("nan")) if len(calls) == 3 else value  # micro-batch 2: step 2's first

    monkeypatch.setattr(trainer.ArTarget, "loss", nan_on_third)
    out = tmp_path / "lora"
    result = trainer.train(config(model_dir, data, cache, out, steps=3, save_every=1))
    assert result.skipped == 1 and result.step == 3
    records = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in records] == [False, True, False]
    # the skipped step changed nothing: the adapter and AdamW's state after step 2 are those after step 1
    assert_identical(adapter(out / "checkpoints/step-000001"), adapter(out / "checkpoints/step-000002"))
    one, two = (mx.load(str(out / f"checkpoints/step-00000{n}/optimizer.safetensors")) for n in (1, 2))
    assert all(np.array_equal(np.array(one[k]), np.array(two[k])) for k in one)


def test_encodings_are_made_once_and_again_when_an_example_changes(model_dir, data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    made = []
    encoder = trainer.ArTarget.encoder

    def counting(self):
        encode_one = encoder(self)
        return lambda example: made.append(example.prompt) or encode_one(example)

    monkeypatch.setattr(trainer.ArTarget, "encoder", counting)
    first = trainer.Trainer(config(model_dir, data, cache, tmp_path / "a", steps=1))
    first_set = first.encodings(first.plan.examples)
    assert len(made) == 4 and len(list(cache.iterdir())) == 4
    made.clear()
    second = trainer.Trainer(config(model_dir, data, cache, tmp_path / "b", steps=1))
    again = second.encodings(second.plan.examples)
    assert made == []
    for x, y in zip(first_set, again):
        assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.position_ids, y.position_ids)
        assert np.array_equal(x.labels, y.labels) and x.grids == y.grids
    changed = tmp_path / "changed"
    shutil.copytree(data, changed)
    lines = (changed / "metadata.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace("OPEN 1", "CLOSED")
    (changed / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(changed / "images/2.png")
    third = trainer.Trainer(config(model_dir, changed, cache, tmp_path / "c", steps=1))
    third.encodings(third.plan.examples)
    assert sorted(made) == sorted(['a sign that says "CLOSED"', 'a sign that says "OPEN 2"'])


def test_the_dit_target_trains_resumes_and_validates(model_dir, data, cache, tmp_path):
    settings = dict(target="dit", steps=4, save_every=2, condition_dropout=0.5, validation_data=str(data),
                    validate_every=2)
    straight = trainer.train(config(model_dir, data, cache, tmp_path / "a", **settings))
    assert straight.step == 4 and (tmp_path / "a/pytorch_lora_weights.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "a/loss.jsonl").read_text().splitlines()]
    assert [("validation_loss" in r) for r in records] == [False, True, False, True]
    out = tmp_path / "b"
    shutil.copytree(tmp_path / "a/checkpoints", out / "checkpoints")
    trainer.train(config(model_dir, data, cache, out, **settings, resume=str(out)))
    assert_identical(adapter(out), adapter(tmp_path / "a"))
    # the validation loss is the held-out examples' mean loss with the adapter of that step, each with its draw
    t = trainer.Trainer(config(model_dir, data, cache, out, **settings, resume=str(out / "checkpoints/step-000002")))
    t.prepare()
    assert t.step == 2
    assert abs(t.validation_loss() - records[1]["validation_loss"]) < 1e-6 * abs(records[1]["validation_loss"])


def test_previews_of_the_validation_prompts(model_dir, data, cache, tmp_path):
    out = tmp_path / "lora"
    trainer.train(config(model_dir, data, cache, out, steps=2, validate_every=2, save_every=0,
                         validation_prompts=["a red door", 'a sign "HI"']))
    shown = sorted((out / "previews/step-000002").iterdir())
    assert [p.name for p in shown] == ["00.png", "01.png"]
    assert Image.open(shown[0]).size == (96, 96)


def test_the_python_api_takes_settings_by_name(model_dir, data, cache, tmp_path):
    result = trainer.train(model=str(model_dir), data=str(data), output=str(tmp_path / "lora"),
                           cache_dir=str(cache), steps=1, **{k: v for k, v in SETTINGS.items()})
    assert result.adapter == tmp_path / "lora" and result.step == 1


# ---- several processes ------------------------------------------------------------------------------------

@pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")
@pytest.mark.parametrize("target", ["ar", "dit"])
def test_two_processes_equal_one(model_dir, data, cache, tmp_path, target):
    args = [*cli_args(model_dir, data, cache, tmp_path / "two", steps=3), "--target", target,
            "--no-gradient-checkpointing"]
    proc = subprocess.run([*ring(2), "--", *argv("train", *args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, start_new_session=True)
    assert proc.returncode == 0, proc.stderr
    one = trainer.train(config(model_dir, data, cache, tmp_path / "one", steps=3, target=target, save_every=2,
                               gradient_checkpointing=False))
    two, ours = adapter(tmp_path / "two"), adapter(one.output)
    for k in ours:
        np.testing.assert_allclose(two[k], ours[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert np.abs(ours[next(k for k in ours if "lora_B" in k)]).max() > 0


def test_grad_accumulation_must_split_over_the_processes(model_dir, data, cache, tmp_path):
    class Two:
        def rank(self):
            return 0

        def size(self):
            return 2

    with pytest.raises(ValueError, match="--grad-accumulation 3 does not split over 2 processes"):
        trainer.Trainer(config(model_dir, data, cache, tmp_path / "x", steps=1, grad_accumulation=3), group=Two())


@pytest.mark.parametrize("target", ["ar", "dit"])
def test_editing_examples_train_both_targets(model_dir, tmp_path, target):
    """Editing records (a source image, fitted as inference fits a condition image, and its target) train, and
    their encodings read back from the cache equal those just made."""
    root = tmp_path / "edit"
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(2):
        rng = np.random.default_rng(10 + i)
        Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(root / f"images/s{i}.png")
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(root / f"images/t{i}.png")
        records.append({"source": f"images/s{i}.png", "target": f"images/t{i}.png", "prompt": f"make it red {i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    c = config(model_dir, root, tmp_path / "cache", tmp_path / "lora", steps=2, target=target, save_every=0)
    t = trainer.Trainer(c)
    made = t.encodings(t.plan.examples)
    again = trainer.Trainer(c).encodings(t.plan.examples)
    for x, y in zip(made, again):
        for name in ("input_ids", "position_ids", "labels") if target == "ar" else \
                ("latents", "prior_token_ids", "condition_latents", "prior_token_image_ids"):
            assert np.array_equal(np.array(getattr(x, name)), np.array(getattr(y, name))), name
    if target == "dit":
        assert made[0].condition_size == (64, 96)  # 70x100 fitted to multiples of 32
    result = trainer.train(c)
    assert result.step == 2 and np.isfinite(result.loss)


def test_a_signal_ignored_at_start_stays_ignored_while_training():
    """Under nohup (SIGHUP ignored) closing the terminal must not stop the run; the others still ask it to stop."""
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with trainer.StopRequest() as stop:
            signal.raise_signal(signal.SIGHUP)
            assert not stop.asked
            signal.raise_signal(signal.SIGTERM)
            assert stop.asked
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)
