"""The CLI end to end on a tiny random checkpoint: prompt -> AR prior tokens -> DiT -> VAE -> PNG; conversion of
every component; clear one-line errors."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_close
from PIL import Image
from tiny_checkpoints import write_pipeline

from mlx_glm_image.convert import convert
from mlx_glm_image.models import AutoencoderKL, GlmImageForConditionalGeneration, GlmImageTransformer2DModel, T5EncoderModel

ROOT = Path(__file__).resolve().parents[1]
# --top-k 1: the random tiny AR model would otherwise sample its end token before the grid is complete
BASE = ["--prompt", 'a red cat "big"', "--height", "64", "--width", "96", "--steps", "2", "--seed", "3", "--top-k", "1", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_pipeline(tmp_path_factory.mktemp("cli") / "tiny-glm-image")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_glm_image.generate", *map(str, args)], capture_output=True, text=True, cwd=ROOT)


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

    vae_a, vae_b = AutoencoderKL.from_pretrained(model_dir / "vae"), AutoencoderKL.from_pretrained(dst / "vae")
    z = mx.array(rng.standard_normal((1, 4, 8, 12)).astype(np.float32))
    assert_close(vae_b.decode(z), vae_a.decode(z), 1e-6)

    t5_a, t5_b = T5EncoderModel.from_pretrained(model_dir / "text_encoder"), T5EncoderModel.from_pretrained(dst / "text_encoder")
    ids = mx.array([[5, 9, 77, 1]])
    assert_close(t5_b(ids), t5_a(ids), 1e-6)

    ar_a = GlmImageForConditionalGeneration.from_pretrained(model_dir / "vision_language_encoder")
    ar_b = GlmImageForConditionalGeneration.from_pretrained(dst / "vision_language_encoder")
    ids = mx.array([[90, 91, 92, 93, 94]])
    assert_close(ar_b(ids), ar_a(ids), 1e-6)

    dit = GlmImageTransformer2DModel.from_pretrained(dst / "transformer")
    assert dit.config.num_layers == 2


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/folder"], "does not exist"),
    (["--height", "50"], "multiples of 32"),
    (["--image", "/no/such.png"], "condition image /no/such.png does not exist"),
    (["--output", "x.jpg"], "must end in .png"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_bad_input_is_one_line(model_dir, tmp_path, args, message):
    base = ["--model", str(model_dir), "--prompt", "x", "--quiet", "--output", str(tmp_path / "never.png")]
    proc = cli(*base, *args)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "never.png").exists()


def test_help_explains():
    proc = cli("--help")
    assert proc.returncode == 0 and "--prompt" in proc.stdout and "quote the text" in proc.stdout
