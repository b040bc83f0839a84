"""The CLI under careless and hostile use (tiny checkpoint, the CLI as a subprocess): huge prompts and counts are
refused up front, concurrent runs never lose an image, signals leave nothing hidden and say what was written,
corrupt AR weights stop the run, and the metadata regenerates from any folder."""

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
import signal_points
from commands import assert_one_line, cli, start
from PIL import Image

ARGS = ["--height", "64", "--width", "64", "--steps", "2", "--top-k", "1", "--quiet"]


def test_a_prompt_longer_than_the_model_reads_is_refused_before_any_load(model_dir, tmp_path):
    """Before: 1 MB of prompt reached the AR model, whose prompt x prompt attention scores crashed the process
    (exit 139). The limit is the checkpoint's max_position_embeddings, counted with the tokenizer."""
    (tmp_path / "long.txt").write_text("a " * 500_000)
    t0 = time.time()
    proc = cli("-m", model_dir, "--prompt-file", tmp_path / "long.txt", *ARGS, "--output", tmp_path / "a.png")
    assert_one_line(proc, "the prompt is too long: with the image's grid it is 500272 tokens, and this model reads at "
                          "most 131072")
    assert time.time() - t0 < 30 and "loaded" not in proc.stderr and not list(tmp_path.glob("*.png"))


def test_quoted_text_longer_than_the_glyph_encoder_reads_is_refused(model_dir, tmp_path):
    """Before: 20,000 quoted strings (within the AR model's context) gave the DiT 80,000 glyph tokens to attend
    over with the image's."""
    (tmp_path / "quotes.txt").write_text('"ab" ' * 20_000)
    proc = cli("-m", model_dir, "--prompt-file", tmp_path / "quotes.txt", *ARGS, "--output", tmp_path / "a.png")
    assert_one_line(proc, "the prompt's quoted text is too long: 80000 glyph tokens in all, at most 2048")
    assert "loaded" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--num-images", str(10**26)], f"--num-images must be from 1 to 10000 (images in one run), got {10**26}"),
    (["--num-images", str(10**7)], "--num-images must be from 1 to 10000"),
    (["--auto-seeds", str(10**9)], "--auto-seeds must be from 1 to 10000"),
    (["--auto-seeds", "0"], "--auto-seeds must be from 1 to 10000"),
    (["--parallel-timeout", "-1"], "argument --parallel-timeout: must be a finite number of seconds above 0, got '-1'"),
    (["--parallel-timeout", "nan"], "must be a finite number of seconds above 0"),
    (["--parallel-timeout", "inf"], "must be a finite number of seconds above 0"),
])
def test_counts_and_timeouts_are_checked_up_front(model_dir, tmp_path, args, message):
    """Before: 1e26 images raised MemoryError, 1e7 and --auto-seeds 1e9 built their plans for minutes; the
    timeout took -1, nan and inf."""
    t0 = time.time()
    proc = cli("-m", model_dir, "--prompt", "x", *ARGS, *args, "--output", tmp_path / "a.png")
    assert_one_line(proc, message)
    assert time.time() - t0 < 15 and not list(tmp_path.glob("*.png"))


def test_a_prompt_file_times_seeds_over_the_limit(model_dir, tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n" * 5001)
    proc = cli("-m", model_dir, "--prompt-file", tmp_path / "p.txt", "--auto-seeds", 2, *ARGS)
    assert_one_line(proc, "the run would make 10002 images (5001 prompts x 2 seeds); a run makes at most 10000")


def test_two_runs_with_the_same_output_keep_both_images(model_dir, tmp_path):
    """Before: both planned a.png (it did not exist yet) and both wrote it: one image was lost."""
    out = tmp_path / "a.png"
    runs = [start("generate", "-m", model_dir, "--prompt", "a cat", *ARGS, "--seed", seed, "--output", out)
            for seed in (1, 2)]
    for p in runs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == ["a-2.png", "a.png"], pngs
    assert {json.loads(Image.open(p).text["glm-image"])["seed"] for p in pngs} == {1, 2}


def test_a_name_taken_after_planning_moves_on(tmp_path, capsys):
    """The claim itself, deterministically: a file that appears between planning and writing is kept."""
    from mlx_glm_image.generate import write_image

    event = type("E", (), {"image": Image.new("RGB", (8, 8), "red"), "metadata": {"prompt": "x", "width": 8,
                                                                                   "height": 8, "steps": 1,
                                                                                   "guidance": 1, "seed": 1,
                                                                                   "model": "m"}})
    for name in ("a.png", "a-2.png"):
        Image.new("RGB", (8, 8), "blue").save(tmp_path / name)
    path = write_image(event, tmp_path / "a.png", tmp_path / "a.png", {})
    assert path == tmp_path / "a-3.png" and np.asarray(Image.open(tmp_path / "a.png"))[0, 0, 2] == 255
    assert f"{tmp_path / 'a-2.png'} exists now: writing {tmp_path / 'a-3.png'}" in capsys.readouterr().err
    assert write_image(event, tmp_path / "a.png", tmp_path / "a.png", {"overwrite": True}) == tmp_path / "a.png"
    assert np.asarray(Image.open(tmp_path / "a.png"))[0, 0, 0] == 255
    assert not list(tmp_path.glob(".*"))


def signal_once_written(proc, folder, pattern: str, count: int, sig) -> int:
    """Send ``sig`` to a run once ``count`` of its images are in ``folder``; its exit code."""
    while len(list(folder.glob(pattern))) < count:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    proc.send_signal(sig)
    return proc.wait(timeout=60)


def test_a_killed_run_leaves_no_temporary_behind(model_dir, tmp_path):
    """Before: SIGTERM during a PNG write left a hidden temporary (no handler ran), and SIGKILL's stayed unless a
    later run wrote the very same name. Now SIGTERM cleans up as Ctrl-C does, and a run removes in its output
    folder what killed runs left."""
    stale = tmp_path / ".other.png.999999999.0badc0de.partial"  # no such process
    stale.write_bytes(b"")
    mine = tmp_path / "notes.partial"  # not this tool's: kept
    mine.write_bytes(b"x")
    proc = start("generate", "-m", model_dir, "--prompt", "a cat", *ARGS, "--num-images", 40, "--seed", 1,
                 "--output", tmp_path / "t.png")
    assert signal_once_written(proc, tmp_path, "t_*.png", 2, signal.SIGTERM) == 130
    err = proc.stderr.read()
    assert "Traceback" not in err and "interrupted; " in err and " of 40 image(s) written" in err, err
    assert not stale.exists() and mine.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial") and p != mine]


def test_ctrl_c_after_some_images_says_how_many(model_dir, tmp_path):
    """Staged memory writes the images in the last stage; the count is of the files there."""
    proc = start("generate", "-m", model_dir, "--prompt", "a cat", *ARGS, "--num-images", 40, "--seed", 1,
                 "--memory", "staged", "--output", tmp_path / "c.png")
    assert signal_once_written(proc, tmp_path, "c_*.png", 3, signal.SIGINT) == 130
    said = proc.stderr.read().strip().splitlines()[-1]
    written = len(list(tmp_path.glob("c_*.png")))
    assert said.startswith(f"interrupted; {written} of 40 image(s) written (the last: "), said


def test_a_signal_at_any_moment_of_a_run_is_one_line_and_leaves_nothing(model_dir, tmp_path):
    """From the moment the entry point (cli.generate) runs: while it imports the package's MLX side (a Ctrl-C
    inside numpy's C import once came out as an ImportError traceback: MLX and numpy are imported with the signal
    held to the import's end, cli.import_whole), reads the checkpoint, or writes the image, a Ctrl-C or SIGTERM is
    one line and exit 130 (or the run had finished), and leaves no temporary. The moments are the ones the run
    reports (its imports and file changes), so a busy machine sends each signal at the same place."""
    args = lambda out: ["-m", model_dir, "--prompt", "a cat", *ARGS, "--output", out]  # noqa: E731
    moments = signal_points.listing("generate", args(tmp_path / "whole.png"), tmp_path)
    assert "import numpy" in moments and any(m.startswith("os.link") for m in moments)
    for i, where in enumerate(signal_points.spread(moments, 12)):
        out, sig = tmp_path / f"a{i}.png", (signal.SIGINT, signal.SIGTERM)[i % 2]
        proc = signal_points.interrupted_at("generate", args(out), where, sig, tmp_path)
        case = (where, moments[where - 1], proc.stderr)
        assert "Traceback" not in proc.stderr, case
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], case
        if proc.returncode == 0:
            assert out.exists(), case
            continue
        said = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 130 and said.startswith("interrupted; "), case
        assert out.exists() == said.startswith("interrupted; 1 of 1 image(s) written"), case


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_a_signal_the_run_was_started_with_ignored_stays_ignored(model_dir, tmp_path, sig):
    """Before: a command started with SIGINT ignored (a shell script's ``cmd &``, a harness run in the background)
    or SIGHUP ignored (nohup) ignored it only until its handlers were set, a few milliseconds in, and was stopped by
    it after: 2 of ~85 early Ctrl-Cs were lost (exit 0, both images written), the later ones stopped the run. Now
    it stays ignored at every moment (as Python itself ignores it then), and SIGTERM still stops the run."""
    args = lambda out: ["-m", model_dir, "--prompt", "a cat", *ARGS, "--num-images", 2, "--output", out]  # noqa: E731
    moments = signal_points.listing("generate", args(tmp_path / "whole.png"), tmp_path)
    # MLX's side imported with signals held, the tokenizer's import (not held), the first image put in place
    chosen = [moments.index("import numpy") + 1, moments.index("import tokenizers") + 1,
              next(i + 1 for i, m in enumerate(moments) if m.startswith("os.link"))]
    early = signal_points.before_the_entry_point("generate", args(tmp_path / "e.png"), sig, tmp_path, ignored=[sig])
    assert early.returncode == 0 and early.stderr == "", early.stderr
    for where in chosen:
        out = tmp_path / f"a{where}.png"
        proc = signal_points.interrupted_at("generate", args(out), where, sig, tmp_path, ignored=[sig])
        assert (proc.returncode, proc.stderr) == (0, ""), (where, moments[where - 1], proc.stderr)
        assert [p.name for p in sorted(tmp_path.glob(f"a{where}_*.png"))] == [f"a{where}_1.png", f"a{where}_2.png"]
    stopped = signal_points.interrupted_at("generate", args(tmp_path / "t.png"), chosen[0], signal.SIGTERM, tmp_path,
                                           ignored=[sig])
    assert stopped.returncode == 130 and stopped.stderr.strip() == "interrupted; no image written", stopped.stderr


def test_a_signal_before_the_entry_point_leaves_nothing(model_dir, tmp_path):
    """Before the command's own code runs, Python answers a Ctrl-C itself; nothing has been made, nothing is left."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = signal_points.before_the_entry_point("generate", ["-m", model_dir, "--prompt", "a cat", *ARGS,
                                                                 "--output", tmp_path / "a.png"], sig, tmp_path)
        assert proc.returncode in (1, -sig), proc.stderr
        assert not list(tmp_path.iterdir())


def test_nan_in_the_ar_weights_stops_at_the_prior_stage(model_copy, tmp_path):
    """Before: NaN logits still sample ids inside the codebook, so the run ended with exit 0 and a PNG."""
    from safetensors.numpy import load_file, save_file

    for shard in (model_copy / "vision_language_encoder").glob("*.safetensors"):
        tensors = load_file(shard)
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"][3, 0] = np.nan
            save_file(tensors, shard, metadata={"format": "pt"})
    proc = cli("-m", model_copy, "--prompt", "a cat", *ARGS, "--output", tmp_path / "a.png")
    assert_one_line(proc, "the prior stage produced non-finite logits (NaN or inf): the weights may be corrupt")
    assert not list(tmp_path.glob("*.png"))


def test_the_metadata_regenerates_from_another_folder(model_dir, tmp_path):
    """Before: the record kept the model path as typed, so a relative one did not resolve from elsewhere."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(model_dir, work / "models" / "tiny")
    proc = cli("-m", "models/tiny", "--prompt", "a cat", *ARGS, "--seed", 4, "--output", "a.png", "--metadata", cwd=work)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((work / "a.json").read_text())
    assert record["model"] == str(work / "models" / "tiny") and record["model_given"] == "models/tiny"
    again = cli("--config-from-metadata", work / "a.png", "--output", tmp_path / "b.png", "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.asarray(Image.open(work / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_a_mistyped_folder_is_not_sent_to_the_hub(model_dir, tmp_path):
    """Before: models/glm-imag looked like a repo id and went to the Hub although models/ is a folder here."""
    (tmp_path / "models").mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = cli("-m", "models/glm-imag", "--prompt", "x", "--quiet", cwd=tmp_path, env=env)
    assert_one_line(proc, "models/glm-imag does not exist (not asked of the Hub: models/ is a folder here)")


@pytest.mark.parametrize("record,message", [
    ({"seed": "7"}, "seed must be an integer, got the string '7'"),
    ({"prompt": ["a", "b"]}, "prompt must be text, got a list"),
    ({"steps": 2.5}, "steps must be an integer, got 2.5"),
    ({"model": 5}, "model must be text, got 5"),
    ({"quantize": True}, "quantize must be an integer, got true"),
])
def test_metadata_of_the_wrong_type_is_one_line(model_dir, tmp_path, record, message):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"prompt": "x", "seed": 1, "model": str(model_dir), **record}))
    proc = cli("--config-from-metadata", path, "--quiet", "--output", tmp_path / "a.png")
    assert_one_line(proc, f"--config-from-metadata {path}: {message}")
