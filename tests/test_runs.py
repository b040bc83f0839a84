"""Many images per run, reproducibly (the CLI as a subprocess, tiny checkpoint): one image per seed, prompt files,
templated outputs, metadata that regenerates an image alone, no silent overwrite, each model loaded once."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from commands import cli, cli_ok
from PIL import Image

ARGS = ["--height", "64", "--width", "96", "--steps", "2", "--quiet", "--dtype", "float32"]


def pixels(path):
    return np.asarray(Image.open(path))


def test_one_image_per_seed_with_sidecars_and_reruns(model_dir, tmp_path):
    cli_ok("-m", model_dir, "--prompt", 'a red cat "big"', *ARGS, "--seed", 11, 12, "--output", tmp_path / "a_{seed}.png",
        "--metadata")
    for seed in (11, 12):
        record = json.loads((tmp_path / f"a_{seed}.json").read_text())
        assert record["seed"] == seed and record["prompt"] == 'a red cat "big"'
        assert (record["width"], record["height"], record["steps"]) == (96, 64, 2)
        assert record["dtype"] == "float32" and record["model"] == str(model_dir)
        assert {"temperature", "top_p", "top_k", "quantization", "versions", "device", "image"} <= set(record)
        assert json.loads(Image.open(tmp_path / f"a_{seed}.png").text["glm-image"]) == record
    assert not np.array_equal(pixels(tmp_path / "a_11.png"), pixels(tmp_path / "a_12.png"))

    # the PNG and the JSON each regenerate image 12 alone, pixel for pixel
    cli_ok("--config-from-metadata", tmp_path / "a_12.png", "--output", tmp_path / "again.png", "--quiet")
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "a_12.png"))
    cli_ok("--config-from-metadata", tmp_path / "a_12.json", "--output", tmp_path / "again_json.png", "--quiet")
    assert np.array_equal(pixels(tmp_path / "again_json.png"), pixels(tmp_path / "a_12.png"))
    # a flag given with it overrides the record
    cli_ok("--config-from-metadata", tmp_path / "a_12.png", "--seed", 11, "--output", tmp_path / "as11.png", "--quiet")
    assert np.array_equal(pixels(tmp_path / "as11.png"), pixels(tmp_path / "a_11.png"))
    assert json.loads(Image.open(tmp_path / "as11.png").text["glm-image"])["seed"] == 11


def test_prompt_files_auto_seeds_and_num_images(model_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red cat\n\nthe big dog on the mat\n")
    cli_ok("-m", model_dir, "--prompt-file", tmp_path / "prompts.txt", *ARGS, "--seed", 5, "--output", tmp_path / "p_{index}.png")
    records = [json.loads(Image.open(tmp_path / f"p_{i}.png").text["glm-image"]) for i in (0, 1)]
    assert [r["prompt"] for r in records] == ["a red cat", "the big dog on the mat"] and not (tmp_path / "p_2.png").exists()

    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a cat", "seed": 3, "size": "64x64"}\n{"prompt": "a dog", "steps": 1}\n')
    cli_ok("-m", model_dir, "--prompt-file", tmp_path / "prompts.jsonl", *ARGS, "--seed", 9, "--output", tmp_path / "j_{prompt}_{seed}.png")
    assert Image.open(tmp_path / "j_a-cat_3.png").size == (64, 64)
    assert json.loads(Image.open(tmp_path / "j_a-dog_9.png").text["glm-image"])["steps"] == 1

    cli_ok("-m", model_dir, "--prompt", "a cat", *ARGS, "--auto-seeds", 3, "--output", tmp_path / "auto.png")
    seeds = {json.loads(Image.open(tmp_path / f"auto_{i}.png").text["glm-image"])["seed"] for i in (1, 2, 3)}
    assert len(seeds) == 3

    cli_ok("-m", model_dir, "--prompt", "a cat", *ARGS, "--seed", 40, "--num-images", 3, "--output", tmp_path / "n.png")
    second = json.loads(Image.open(tmp_path / "n_2.png").text["glm-image"])
    assert second["seed"] == 41
    cli_ok("-m", model_dir, "--prompt", "a cat", *ARGS, "--seed", 41, "--output", tmp_path / "alone.png")
    assert np.array_equal(pixels(tmp_path / "alone.png"), pixels(tmp_path / "n_2.png")), "image 2 regenerates alone"


def test_existing_files_are_never_overwritten_silently(model_dir, tmp_path):
    out = tmp_path / "x.png"
    cli_ok("-m", model_dir, "--prompt", "a cat", *ARGS, "--seed", 1, "--output", out)
    first = pixels(out)
    proc = cli_ok("-m", model_dir, "--prompt", "a cat", *ARGS, "--seed", 2, "--output", out)
    assert np.array_equal(pixels(out), first) and (tmp_path / "x-2.png").exists()
    assert f"{out} exists: writing {tmp_path / 'x-2.png'}" in proc.stderr
    cli_ok("-m", model_dir, "--prompt", "a cat", *ARGS, "--seed", 2, "--output", out, "--overwrite")
    assert np.array_equal(pixels(out), pixels(tmp_path / "x-2.png"))


def test_print_config_loads_nothing(model_dir, tmp_path, monkeypatch, capsys):
    import mlx_glm_image.loading as loading
    from mlx_glm_image import generate

    reads = []
    monkeypatch.setattr(loading, "load_weights", lambda folder: reads.append(folder))
    argv = ["-m", str(model_dir), "--prompt", "a cat", *ARGS, "--seed", "7", "8", "--output", str(tmp_path / "c_{seed}.png"),
            "--print-config"]
    assert generate.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seed"] for r in rows] == [7, 8] and rows[0]["output"] == str(tmp_path / "c_7.png")
    assert (rows[0]["temperature"], rows[0]["top_k"]) == (1.0, 50), "resolved: generation_config.json + transformers defaults"
    assert reads == [] and not list(tmp_path.glob("*.png"))


def test_a_run_of_four_images_loads_each_model_once(model_dir, tmp_path, monkeypatch):
    import mlx_glm_image.loading as loading
    from mlx_glm_image import generate

    reads = []
    real = loading.load_weights
    monkeypatch.setattr(loading, "load_weights", lambda folder: reads.append(Path(folder).name) or real(folder))
    argv = ["-m", str(model_dir), "--prompt", "a cat", *ARGS, "--seed", "1", "2", "3", "4", "--memory", "staged",
            "--output", str(tmp_path / "f_{seed}.png")]
    assert generate.main(argv) == 0
    assert sorted(reads) == ["text_encoder", "transformer", "vae", "vision_language_encoder"]
    assert len(list(tmp_path.glob("f_*.png"))) == 4


def test_bad_run_arguments_are_one_line(model_dir, tmp_path):
    for args, message in [(["--prompt", "x", "--seed", "1", "2", "--num-images", "2"], "--num-images counts from one --seed"),
                          (["--prompt", "x", "--output", str(tmp_path / "{nope}.png")], "unknown field {nope}"),
                          (["--prompt-file", str(tmp_path / "none.txt")], "does not exist"),
                          (["--prompt", "x", "--prompt-file", str(tmp_path / "none.txt")], "--prompt and --prompt-file do not go together"),
                          (["--prompt", "x", "--config-from-metadata", str(tmp_path / "none.png")], "does not exist")]:
        proc = cli("-m", model_dir, *args)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
        assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize("script,usage", [("mlx-glm-image", "mlx-glm-image --prompt-file"),
                                          ("mlx-glm-image-convert", "mlx-glm-image-convert --hf-path")])
def test_help_names_the_console_script(script, usage):
    import shutil
    import sysconfig

    path = shutil.which(script) or str(Path(sysconfig.get_path("scripts")) / script)
    proc = subprocess.run([path, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {script}"), proc.stdout[:200]
    assert usage in proc.stdout


def test_the_step_cache_from_the_cli_and_its_metadata(model_dir, tmp_path):
    """--cache and cache-dit's field flags; the record holds the settings and the cached steps, and regenerates the
    image bit for bit. (The tiny DiT has 2 blocks: SGLang's F2 B1 does not fit, which is said before any load.)"""
    proc = cli("-m", model_dir, "--prompt", "x", *ARGS, "--cache", "--output", tmp_path / "never.png")
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: Fn_compute_blocks + Bn_compute_blocks (2 + 1) must be at most the DiT's 2 blocks")
    cache = ["--cache", "--Fn", 1, "--Bn", 0, "--ws", 1, "--rdt", 0.9, "--taylorseer-order", 1]
    args = ["-m", model_dir, "--prompt", 'a red cat "big"', "--height", "64", "--width", "96", "--steps", 6, "--seed", 4,
            "--dtype", "float32"]
    proc = cli_ok(*args, *cache, "--output", tmp_path / "cached.png")
    assert "DiT blocks computed" in proc.stdout, proc.stdout
    record = json.loads(Image.open(tmp_path / "cached.png").text["glm-image"])
    assert record["cache"]["Fn_compute_blocks"] == 1 and record["cache"]["residual_diff_threshold"] == 0.9
    assert record["calibrator"] == {"taylorseer_order": 1} and record["cache_summary"]["cached_steps"]
    cli_ok(*args, "--quiet", "--output", tmp_path / "plain.png")
    assert not np.array_equal(pixels(tmp_path / "cached.png"), pixels(tmp_path / "plain.png"))
    cli_ok("--config-from-metadata", tmp_path / "cached.png", "--quiet", "--output", tmp_path / "again.png")
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "cached.png"))
