"""The CLI's smaller refusals of issue 33 (tiny checkpoint, the CLI as a subprocess unless a fault is injected):
flags a run would ignore or name wrongly, --check checking the flags a run checks, a config refused before any
model loads, and a failed write that says what is on disk."""

import errno
import json
import os

import pytest
from commands import assert_one_line, cli

ARGS = ["--height", "64", "--width", "64", "--steps", "2", "--top-k", "1", "--quiet"]
OFFLINE = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HF_HUB_OFFLINE": "1"}


def test_previews_without_their_folder_are_one_line(model_dir, tmp_path):
    """Before: --previews 3 alone and --preview-dir '' ran and wrote no preview, silently."""
    for args, message in ((["--previews", 3], "--previews 3 needs --preview-dir"),
                          (["--preview-dir", ""], "--preview-dir is empty: name the folder the previews go to")):
        proc = cli("-m", model_dir, "--prompt", "a cat", *ARGS, *args, "--output", tmp_path / "a.png", cwd=tmp_path)
        assert_one_line(proc, message)
    assert not list(tmp_path.iterdir())


def test_a_preview_dir_that_is_a_file_names_the_flag(model_dir, tmp_path):
    """Before: "--output notes.txt/preview.png: notes.txt is not a folder", a path the user never gave."""
    (tmp_path / "notes.txt").write_text("mine")
    proc = cli("-m", model_dir, "--prompt", "a cat", *ARGS, "--preview-dir", tmp_path / "notes.txt",
               "--output", tmp_path / "a.png")
    assert_one_line(proc, f"--preview-dir {tmp_path / 'notes.txt'}: {tmp_path / 'notes.txt'} is not a folder")
    assert "--output" not in proc.stderr and not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "steps must be an integer from 1 to 1000, got 0"),
    (["--guidance", "-1"], "guidance must be a number from 0 to 100, got -1.0"),
    (["--seed", "-3"], "seed must be an integer from 0 to 2**64 - 1, got -3"),
    (["--lora", "nope"], "--lora nope does not exist"),
    (["--parallel", "tensor"], "--check answers for one process that holds every model and does not take --parallel"),
    (["--previews", "3"], "--previews 3 needs --preview-dir"),
    (["--prompt", "x", "--prompt-file", "p.txt"], "--prompt and --prompt-file do not go together"),
    (["--num-images", "0"], "--num-images must be from 1 to 10000"),
    (["--output", "a.jpg"], "--output must end in .png"),
])
def test_check_refuses_what_the_run_would_refuse(model_dir, tmp_path, args, message):
    """Before: --check gave its verdict (exit 0) whatever the other flags said; the run then refused them."""
    proc = cli("--check", "-m", model_dir, *args, env=OFFLINE, cwd=tmp_path, timeout=120)
    assert_one_line(proc, message)
    assert proc.stdout == ""


def test_check_reads_a_local_adapter_as_the_run_does(model_dir, tmp_path):
    missing = tmp_path / "no-such-adapter"
    proc = cli("--check", "-m", model_dir, "--lora", missing, env=OFFLINE, timeout=120)
    assert_one_line(proc, "--lora")
    assert str(missing) in proc.stderr and proc.stdout == ""
    (tmp_path / "empty.safetensors").write_bytes(b"")
    proc = cli("--check", "-m", model_dir, "--lora", tmp_path / "empty.safetensors", env=OFFLINE, timeout=120)
    assert_one_line(proc, f"--lora {tmp_path / 'empty.safetensors'}")


def test_check_with_good_flags_gives_its_verdict(model_dir, tmp_path):
    proc = cli("--check", "-m", model_dir, "--steps", "30", "--seed", "1", "--preview-dir", tmp_path / "p",
               "--previews", "3", "--output", tmp_path / "out_{seed}.png", env=OFFLINE, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("verdict         can run: ")
    assert not list(tmp_path.iterdir()), "--check writes nothing"


def test_a_dit_config_with_zero_heads_is_refused_before_any_model_loads(model_copy, tmp_path):
    """Before: the AR model loaded and ran the prior stage (and the glyph encoder its own) before the DiT's config
    was built and refused."""
    path = model_copy / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_attention_heads": 0}))
    proc = cli("-m", model_copy, "--prompt", "a cat", *ARGS[:-1], "--output", tmp_path / "a.png")
    assert_one_line(proc, f"{model_copy / 'transformer'}/config.json does not describe a transformer: division by zero "
                          "(zero or negative: num_attention_heads)")
    assert "loaded" not in proc.stderr and not (tmp_path / "a.png").exists()


def test_a_full_disk_says_how_many_images_were_written(model_dir, tmp_path, monkeypatch, capsys):
    """Before: "error: No space left on device" alone, with two images of three on disk. The third PNG's write
    fails as a full disk fails it (PIL's write, ENOSPC); the line says what is there, and nothing half-written
    stays."""
    from PIL import Image

    from mlx_glm_image import generate

    real, saves = Image.Image.save, []

    def save(image, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    code = generate.main(["-m", str(model_dir), "--prompt", "a cat", *ARGS, "--num-images", "3", "--seed", "1",
                          "--metadata", "--output", str(tmp_path / "d.png")])
    err = capsys.readouterr().err
    assert code == 1 and err == (f"error: {os.strerror(errno.ENOSPC)}; 2 of 3 image(s) written (the last: "
                                 f"{tmp_path / 'd_2.png'})\n"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d_1.json", "d_1.png", "d_2.json", "d_2.png"]
