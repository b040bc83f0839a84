"""The CLI end to end on a tiny random checkpoint: prompt -> AR prior tokens -> DiT -> VAE -> PNG; conversion of
every component; clear one-line errors."""

import shutil
import time

import mlx.core as mx
import numpy as np
import pytest
from commands import assert_one_line, cli, run
from conftest import assert_close
from PIL import Image

from mlx_glm_image.convert import convert
from mlx_glm_image.loading import load_model
from mlx_glm_image.models import AutoencoderKL, GlmImageForConditionalGeneration, GlmImageTransformer2DModel, T5EncoderModel

# --top-k 1: the random tiny AR model would otherwise sample its end token before the grid is complete
BASE = ["--prompt", 'a red cat "big"', "--height", "64", "--width", "96", "--steps", "2", "--seed", "3", "--top-k", "1", "--quiet"]


def test_text_to_image_png_with_metadata_and_seed(model_dir, tmp_path):
    out = tmp_path / "a.png"
    proc = cli("--model", model_dir, *BASE, "--output", out, "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    image = Image.open(out)
    assert image.size == (96, 64)
    assert image.text["prompt"] == 'a red cat "big"' and "seed=3" in image.text["parameters"]
    assert cli("--model", model_dir, *BASE, "--output", tmp_path / "b.png", "--dtype", "float32").returncode == 0
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / "b.png"))), "same seed, same image"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_editing_and_several_images(model_dir, tmp_path):
    source = tmp_path / "source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(source)
    proc = cli("--model", model_dir, *BASE, "--image", source, "--num-images", "2", "--output", tmp_path / "edit.png",
               "--memory", "staged", "--vae-tiling", "on")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "edit_1.png").size == (96, 64) and (tmp_path / "edit_2.png").exists()


def test_converted_quantized_model_generates(model_dir, tmp_path):
    """convert.py -q 4 of every component, then the CLI; and --quantize 8 at load time on the original."""
    dst = tmp_path / "q4"
    convert(str(model_dir), dst, quantize=True, q_bits=4, q_group_size=32, verbose=False)
    proc = cli("--model", dst, *BASE, "--output", tmp_path / "q.png")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "q.png").size == (96, 64)
    proc = cli("--model", model_dir, *BASE, "--quantize", "8", "--output", tmp_path / "q8.png")
    assert proc.returncode == 0, proc.stderr


def test_every_component_converts_exactly(model_dir, tmp_path):
    """fp32 conversion of the whole pipeline: each converted component computes what the original folder does."""
    dst = tmp_path / "fp32"
    summary = convert(str(model_dir), dst, verbose=False)
    assert {s[0] for s in summary} == {"transformer", "vision_language_encoder", "text_encoder", "vae"}
    for name in ("processor", "tokenizer", "scheduler"):
        assert (dst / name).is_dir()
    rng = np.random.default_rng(0)

    vae_a, vae_b = load_model(AutoencoderKL, model_dir / "vae"), load_model(AutoencoderKL, dst / "vae")
    z = mx.array(rng.standard_normal((1, 4, 8, 12)).astype(np.float32))
    assert_close(vae_b.decode(z), vae_a.decode(z), 1e-6)

    t5_a, t5_b = load_model(T5EncoderModel, model_dir / "text_encoder"), load_model(T5EncoderModel, dst / "text_encoder")
    ids = mx.array([[5, 9, 77, 1]])
    assert_close(t5_b(ids), t5_a(ids), 1e-6)

    ar_a = load_model(GlmImageForConditionalGeneration, model_dir / "vision_language_encoder")
    ar_b = load_model(GlmImageForConditionalGeneration, dst / "vision_language_encoder")
    ids = mx.array([[90, 91, 92, 93, 94]])
    assert_close(ar_b(ids), ar_a(ids), 1e-6)

    dit = load_model(GlmImageTransformer2DModel, dst / "transformer")
    assert dit.config.num_layers == 2


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/folder"], "does not exist"),
    (["--model", "./no/such"], "does not exist"),  # looks local: never sent to the Hub
    (["--height", "50"], "multiples of 32"),
    (["--height", "0"], "positive multiples of 32, got 1024x0 (width x height)"),
    (["--height", "65536", "--width", "65536"], "at most 128 pixels each"),
    (["--image", "/no/such.png"], "condition image /no/such.png does not exist"),
    (["--output", "x.jpg"], "must end in .png"),
    (["--steps", "0"], "steps must be an integer from 1 to 1000, got 0"),
    (["--steps", "1001"], "steps must be an integer from 1 to 1000"),
    (["--guidance", "inf"], "guidance must be a number from 0 to 100, got inf"),
    (["--guidance", "-1"], "guidance must be a number from 0 to 100"),
    (["--temperature", "0"], "temperature must be a finite number > 0"),
    (["--temperature", "nan"], "temperature must be a finite number > 0"),
    (["--top-p", "0"], "top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["--top-k", "-1"], "top-k must be an integer >= 0"),
    (["--seed", "-1"], "seed must be an integer from 0 to 2**64 - 1, got -1"),
    (["--seed", str(2**64)], "seed must be an integer from 0 to 2**64 - 1"),
    (["--seed", "abc"], "argument --seed: invalid int value"),
    (["--num-images", "0"], "--num-images must be from 1 to 10000 (images in one run), got 0"),
])
def test_bad_input_is_one_line(model_dir, tmp_path, args, message):
    base = ["--model", str(model_dir), "--prompt", "x", "--quiet", "--output", str(tmp_path / "never.png")]
    t0 = time.time()
    proc = cli(*base, *args)
    assert_one_line(proc, message)
    assert time.time() - t0 < 10, "checked before any model is loaded"
    assert not (tmp_path / "never.png").exists()


def test_bad_output_place_fails_before_any_model_loads(model_dir, tmp_path):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file").write_text("x")
    for output, message in [(tmp_path / "folder.png", "is a folder"), (tmp_path / "file" / "a.png", "is not a folder")]:
        t0 = time.time()
        proc = cli("--model", model_dir, *BASE, "--output", output)
        assert_one_line(proc, message)
        assert time.time() - t0 < 10
    assert (tmp_path / "file").read_text() == "x"


def test_full_disk_and_os_errors_are_one_line(model_dir, tmp_path, monkeypatch, capsys):
    from mlx_glm_image import generate, metadata

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 1 << 40, 4096))
    assert generate.main(["--model", str(model_dir), *BASE, "--output", str(tmp_path / "a.png")]) == 1
    assert "MB free; 1 image(s) need up to" in capsys.readouterr().err
    monkeypatch.undo()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "a.png"))

    monkeypatch.setattr(metadata, "write", disk_full)
    assert generate.main(["--model", str(model_dir), *BASE, "--output", str(tmp_path / "a.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: No space left on device: {tmp_path / 'a.png'}; no image written"]
    assert not list(tmp_path.glob("*.png"))


def test_invalid_utf8_prompt(model_dir, tmp_path):
    proc = cli("--model", model_dir, "--prompt", b"caf\xe9 \xff", "--output", tmp_path / "a.png")
    assert_one_line(proc, "the prompt is not valid UTF-8 text")


def test_missing_component_is_named_before_the_ar_stage(model_copy, tmp_path):
    shutil.rmtree(model_copy / "text_encoder")
    t0 = time.time()
    proc = cli("--model", model_copy, *BASE, "--output", tmp_path / "a.png")
    assert_one_line(proc, "lacks text_encoder/")
    assert time.time() - t0 < 10 and not (tmp_path / "a.png").exists()


def test_config_of_the_wrong_type(model_copy, tmp_path):
    import json

    config = json.loads((model_copy / "transformer" / "config.json").read_text())
    config["num_layers"] = "two"
    (model_copy / "transformer" / "config.json").write_text(json.dumps(config))
    proc = cli("--model", model_copy, *BASE, "--output", tmp_path / "a.png")
    assert_one_line(proc, "config.json does not describe a transformer: num_layers must be int, got 'two'")


def test_hub_failure_is_one_line(tmp_path):
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = cli("--model", "nobody/no-such-model", *BASE, "--output", tmp_path / "a.png", env=env)
    assert_one_line(proc, "could not fetch nobody/no-such-model from the Hugging Face Hub")


def test_nan_weights_stop_at_the_stage_without_a_png(model_copy, tmp_path):
    from safetensors.numpy import load_file, save_file

    for shard in (model_copy / "transformer").glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in tensors.items()}, shard)
    proc = cli("--model", model_copy, *BASE, "--output", tmp_path / "a.png")
    assert_one_line(proc, "the denoise stage produced non-finite latents")
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*.tmp"))


def test_png_follows_the_umask(model_dir, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        proc = cli("--model", model_dir, *BASE, "--output", tmp_path / "a.png")
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((tmp_path / "a.png").stat().st_mode) == 0o644


@pytest.fixture(scope="module")
def early_eos_dir(tmp_path_factory):
    from tiny_checkpoints import write_diffusion_side, write_prior, N_VISION

    root = tmp_path_factory.mktemp("eos") / "tiny-glm-image"
    write_diffusion_side(root, codebook=N_VISION)
    write_prior(root, eos_row_zero=False, vision_patch=16)  # this model samples its end token early
    return root


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_early_end_token_still_gives_a_whole_image(early_eos_dir, tmp_path, seed):
    args = ["--prompt", "a red cat", "--height", "64", "--width", "96", "--steps", "1", "--quiet", "--dtype", "float32"]
    proc = cli("--model", early_eos_dir, *args, "--seed", seed, "--output", tmp_path / "a.png")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "a.png").size == (96, 64)


def _png_header_only(path, width, height):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _condition_images(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    out = {}
    out["16-bit"] = tmp_path / "g16.png"
    Image.fromarray(rng.integers(0, 65535, (64, 96), dtype=np.uint16)).save(out["16-bit"])
    out["rgba"] = tmp_path / "rgba.png"
    rgb.convert("RGBA").save(out["rgba"])
    out["palette"] = tmp_path / "p.png"
    rgb.convert("P").save(out["palette"])
    out["cmyk"] = tmp_path / "cmyk.jpg"
    rgb.convert("CMYK").save(out["cmyk"])
    out["exif-rotated"] = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: 96 wide, 64 high stored -> 64 wide, 96 high shown
    rgb.save(out["exif-rotated"], exif=exif)
    out["large"] = tmp_path / "large.png"
    rgb.resize((480, 320)).save(out["large"])  # over the tiny processor's 128x128-pixel limit
    return out


def test_condition_images_of_any_kind(model_dir, tmp_path):
    from mlx_glm_image.pipeline.image_processor import load_image

    images = _condition_images(tmp_path)
    g16 = load_image(images["16-bit"])
    assert g16.mode == "RGB" and np.asarray(g16).max() > 200, "16-bit values are scaled, not clipped to white"
    assert np.asarray(g16).min() < 50
    assert load_image(images["exif-rotated"]).size == (64, 96)
    for kind, path in images.items():
        proc = cli("--model", model_dir, *BASE[:2], "--steps", "1", "--seed", "3", "--quiet", "--image", path,
                   "--output", tmp_path / f"out_{kind}.png")
        assert proc.returncode == 0, (kind, proc.stderr)
        want = {"exif-rotated": (64, 96), "large": (128, 64)}.get(kind, (96, 64))  # large: fitted to 128 px, x32
        assert Image.open(tmp_path / f"out_{kind}.png").size == want, kind


def test_decompression_bomb_is_refused(model_dir, tmp_path):
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 40000, 40000)
    proc = cli("--model", model_dir, *BASE, "--image", bomb, "--output", tmp_path / "a.png")
    assert_one_line(proc, "refused as a possible decompression bomb")


def test_help_explains():
    proc = cli("--help")
    assert proc.returncode == 0 and "--prompt" in proc.stdout and "quote the text" in proc.stdout


def test_converting_a_source_without_its_vae_is_refused(model_copy, tmp_path):
    shutil.rmtree(model_copy / "vae")
    proc = run("convert.py", "--hf-path", model_copy, "--mlx-path", tmp_path / "out")
    assert_one_line(proc, "lacks vae/, which model_index.json lists")
    assert not (tmp_path / "out").exists()


def test_previews_written_as_they_come(model_dir, tmp_path):
    proc = cli("--model", model_dir, *BASE[:-1], "--steps", "6", "--output", tmp_path / "a.png",
               "--preview-dir", tmp_path / "previews", "--previews", "2")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["a_preview-1_step-2.png", "a_preview-2_step-4.png"]
    assert Image.open(tmp_path / "previews" / "a_preview-1_step-2.png").size == (96, 64)
    plain = cli("--model", model_dir, *BASE[:-1], "--steps", "6", "--output", tmp_path / "b.png")
    assert plain.returncode == 0 and np.array_equal(np.asarray(Image.open(tmp_path / "a.png")),
                                                    np.asarray(Image.open(tmp_path / "b.png")))
    (tmp_path / "file").write_text("x")
    assert_one_line(cli("--model", model_dir, *BASE, "--output", tmp_path / "c.png", "--preview-dir", tmp_path / "file"),
                    "is not a folder")
