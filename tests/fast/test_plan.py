"""The CLI's planning, before any model: the images of a run (prompts x seeds, prompt files, recorded metadata),
their output paths, and the atomic writes' temporaries (no model, no torch)."""

import os

import numpy as np
import pytest
from PIL import Image

from mlx_glm_image import atomic, metadata, runs
from mlx_glm_image.generate import build_parser, plan


def planned(*argv):
    return plan(build_parser().parse_args(list(argv)))


def test_seeds_and_prompts_make_the_images():
    run, images = planned("--prompt", "a cat", "--seed", "4", "--num-images", "3", "--steps", "7")
    assert [i["seed"] for i in images] == [4, 5, 6] and {i["steps"] for i in images} == {7}
    assert run["model"] == "zai-org/GLM-Image" and run["dtype"] == "bfloat16" and run["memory"] == "auto"
    _, images = planned("--prompt", "a cat", "--seed", "1", "2")
    assert [i["seed"] for i in images] == [1, 2] and images[0]["guidance"] is None, "unset: the pipeline's default"
    with pytest.raises(ValueError, match="give --prompt"):
        planned("--steps", "2")


def test_prompt_files(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "seed": 3, "size": "64x96"}\n{"prompt": "a dog", "steps": 2}\n')
    _, images = planned("--prompt-file", str(jsonl), "--seed", "9")
    assert [(i["prompt"], i["seed"], i["width"], i["height"]) for i in images] == [("a cat", 3, 64, 96), ("a dog", 9, None, None)]
    assert images[1]["steps"] == 2
    jsonl.write_text('{"prompt": "a cat", "stepz": 3}\n')
    with pytest.raises(ValueError, match="line 1.*not \\['stepz'\\]"):
        planned("--prompt-file", str(jsonl))


def test_recorded_settings_with_a_flag_that_overrides(tmp_path):
    record = {"prompt": "a cat", "seed": 12, "height": 64, "width": 96, "steps": 2, "guidance": 3.0,
              "temperature": 0.9, "top_p": 0.75, "top_k": 0, "image": [], "model": "m", "quantize": None, "dtype": "float32"}
    png = tmp_path / "a.png"
    metadata.write(Image.fromarray(np.zeros((8, 8, 3), np.uint8)), png, record)
    run, (image,) = planned("--config-from-metadata", str(png), "--steps", "5")
    assert (image["prompt"], image["seed"], image["steps"], image["guidance"], image["height"]) == ("a cat", 12, 5, 3.0, 64)
    assert run["model"] == "m" and run["dtype"] == "float32"


def test_output_paths(tmp_path):
    images = [{"seed": 1, "prompt": "A red cat!"}, {"seed": 2, "prompt": "a dog"}]
    paths = [p for p, _ in runs.output_paths(str(tmp_path / "{index}_{prompt}_{seed}.png"), images, False)]
    assert [p.name for p in paths] == ["0_a-red-cat_1.png", "1_a-dog_2.png"]
    (tmp_path / "x.png").write_bytes(b"")
    (path, asked), = runs.output_paths(str(tmp_path / "x.png"), images[:1], False)
    assert path.name == "x-2.png" and asked == tmp_path / "x.png", "an existing file is never overwritten"
    assert [p.name for p, _ in runs.output_paths(str(tmp_path / "y.png"), images, False)] == ["y_1.png", "y_2.png"]
    with pytest.raises(ValueError, match="unknown field"):
        runs.output_paths(str(tmp_path / "{nope}.png"), images, False)
    with pytest.raises(ValueError, match="must end in .png"):
        runs.output_paths(str(tmp_path / "a.jpg"), images, False)


def test_atomic_writes_leave_nothing_half_done(tmp_path):
    target = tmp_path / "out.png"
    with pytest.raises(RuntimeError):
        with atomic.replacing(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert not target.exists() and not list(tmp_path.iterdir())
    stale = tmp_path / ".out.png.999999999.abcd.partial"  # a killed run's (no such process)
    stale.write_bytes(b"")
    mine = tmp_path / f".out.png.{os.getpid()}.beef.partial"  # a writer still running
    mine.write_bytes(b"")
    with atomic.replacing(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and not stale.exists() and mine.exists()
    mask = os.umask(0o027)
    try:
        with atomic.replacing(tmp_path / "folder", folder=True) as tmp:
            (tmp / "a").write_text("1")
    finally:
        os.umask(mask)
    assert (tmp_path / "folder" / "a").read_text() == "1" and (tmp_path / "folder").stat().st_mode & 0o777 == 0o750
