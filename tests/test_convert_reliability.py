"""convert.py and the loader on what a new user's trial met: each bad input is one line (exit 1) before any
weights are read, each interruption says what is on disk (exit 130), and nothing the user had is lost or hidden."""

import json
import resource
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest
import signal_points
from commands import run
from test_convert import assert_clean_failure, copy_source
from tiny_checkpoints import write_prior

from mlx_glm_image import GlmImageTransformer2DModel, atomic, load_model, loading
from mlx_glm_image import convert as C

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture(scope="module")
def ar_source(tmp_path_factory):
    """A pipeline folder with the AR model (vision_language_encoder/ in shards with model.safetensors.index.json)."""
    folder = tmp_path_factory.mktemp("ar") / "glm-image"
    write_prior(folder)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "GlmImagePipeline", "processor": ["transformers", "GlmImageProcessor"],
        "vision_language_encoder": ["transformers", "GlmImageForConditionalGeneration"]}))
    return folder


@pytest.fixture(scope="module")
def quantized(transformer_only, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "q4"
    C.convert(str(transformer_only), out, quantize=True, q_bits=4, verbose=False)
    return out


def run_main(capsys, *args):
    """convert.main in this process: (exit code, stderr lines); the signal handlers main installs are restored."""
    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        code = C.main([str(a) for a in args])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_one_line(code, lines, *parts):
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), lines
    for part in parts:
        assert str(part) in lines[0], lines


def no_partials(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.endswith((".partial", ".old"))]


# ---------------------------------------------------------------------------------------------------------
# 1. A write that fails (disk full): one line naming the file and the free space; the old output stays


def test_a_failed_write_is_one_line_and_the_old_output_stays(transformer_only, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    limit = 1 << 20  # the output's one shard is ~4 MB: MLX's write fails, as on a full disk

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = run("convert.py", "--hf-path", transformer_only, "--mlx-path", out, "--force", preexec_fn=small_files)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("converting")]  # the bar
    assert len(said) == 1 and said[0].startswith("error: could not write "), proc.stderr
    assert "model-00001.safetensors" in said[0] and "free on that disk" in said[0]
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and no_partials(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# 2. --shard-size-gb must be a finite size above zero


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1"])
def test_shard_size_must_be_positive_and_finite(transformer_only, tmp_path, value):
    proc = run("convert.py", "--hf-path", transformer_only, "--mlx-path", tmp_path / "out", f"--shard-size-gb={value}")
    assert_clean_failure(proc, "--shard-size-gb", tmp_path)
    assert "a finite number of GB above 0" in proc.stderr and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# 3. A safetensors header that is not a table of {dtype, shape, data_offsets}: one line naming the file


def rewrite_header(path: Path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(edit(json.loads(data[8:8 + n]))).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n:])


def without(field):
    return lambda h: {k: v if k == "__metadata__" else {f: x for f, x in v.items() if f != field} for k, v in h.items()}


@pytest.mark.parametrize("edit,why", [
    (lambda h: [1, 2], "not a JSON object"),
    (without("dtype"), "dtype"),
    (without("shape"), "shape"),
    (without("data_offsets"), "data_offsets"),
    (lambda h: {k: "x" for k in h}, "is not an object"),
    (lambda h: {k: v if k == "__metadata__" else {**v, "data_offsets": "ab"} for k, v in h.items()}, "data_offsets"),
    (lambda h: {k: v if k == "__metadata__" else {**v, "shape": [-1]} for k, v in h.items()}, "shape"),
])
def test_a_malformed_safetensors_header_is_one_line(transformer_only, tmp_path, capsys, edit, why):
    src = copy_source(transformer_only, tmp_path / "src")
    shard = sorted((src / "transformer").glob("*.safetensors"))[0]
    rewrite_header(shard, edit)
    code, lines = run_main(capsys, "--hf-path", src, "--mlx-path", tmp_path / "out")
    assert_one_line(code, lines, shard, why)
    assert not (tmp_path / "out").exists() and no_partials(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# 4. A config whose zero sizes make the model unbuildable: one line naming the config


@pytest.mark.parametrize("key", ["num_attention_heads", "attention_head_dim", "patch_size", "time_embed_dim"])
def test_a_zero_size_in_the_dit_config_is_one_line(transformer_only, tmp_path, capsys, key):
    src = copy_source(transformer_only, tmp_path / "src")
    path = src / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: 0}))
    code, lines = run_main(capsys, "--hf-path", src, "--mlx-path", tmp_path / "out")
    assert_one_line(code, lines, path, f"zero or negative: {key}")


def test_a_zero_size_in_the_ar_config_is_one_line(ar_source, tmp_path, capsys):
    src = copy_source(ar_source, tmp_path / "src")
    path = src / "vision_language_encoder" / "config.json"
    config = json.loads(path.read_text())
    config["text_config"]["num_attention_heads"] = 0
    path.write_text(json.dumps(config))
    code, lines = run_main(capsys, "--hf-path", src, "--mlx-path", tmp_path / "out")
    assert_one_line(code, lines, path, "zero or negative: text_config.num_attention_heads")


# ---------------------------------------------------------------------------------------------------------
# 5. A corrupt index of the AR model's shards: one line naming it


@pytest.mark.parametrize("text,why", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a JSON object"),
    ('{"metadata": {}}', "has no weight_map"),
    ('{"weight_map": ["a"]}', "weight_map must map each weight to a file name"),
    ('{"weight_map": {"a": 3}}', "weight_map must map each weight to a file name"),
    ('{"metadata": "mlx", "weight_map": {"a": "model-00001-of-00008.safetensors"}}', "metadata must be an object"),
])
def test_a_corrupt_shard_index_is_one_line(ar_source, tmp_path, capsys, text, why):
    src = copy_source(ar_source, tmp_path / "src")
    index = src / "vision_language_encoder" / "model.safetensors.index.json"
    index.write_text(text)
    code, lines = run_main(capsys, "--hf-path", src, "--mlx-path", tmp_path / "out")
    assert_one_line(code, lines, index, why)


def test_a_shard_index_naming_a_missing_file_is_one_line(ar_source, tmp_path, capsys):
    src = copy_source(ar_source, tmp_path / "src")
    index = src / "vision_language_encoder" / "model.safetensors.index.json"
    table = json.loads(index.read_text())
    table["weight_map"]["lm_head.weight"] = "model-00009-of-00008.safetensors"
    index.write_text(json.dumps(table))
    code, lines = run_main(capsys, "--hf-path", src, "--mlx-path", tmp_path / "out")
    assert_one_line(code, lines, "model-00009-of-00008.safetensors is named by model.safetensors.index.json")


# ---------------------------------------------------------------------------------------------------------
# 6. A converted folder whose quantization block is not one: one line naming its config, when it is loaded


@pytest.mark.parametrize("block,why", [
    ("yes", "must be an object"),
    ([4], "must be an object"),
    ({"bits": "4", "group_size": 64}, "bits"),
    ({"bits": 4, "group_size": 64, "mode": "foo"}, "unknown quantization mode 'foo'"),
    ({"bits": 4, "group_size": 7}, "group sizes"),
    ({"bits": 0, "group_size": 64}, "got bits 0"),
    ({"bits": 4, "group_size": 64, "proj_out": "no"}, "proj_out"),
    ({"bits": 4, "group_size": 64, "proj_out": {"bits": 9}}, "got bits 9"),
])
def test_a_bad_quantization_block_is_refused_at_load(quantized, tmp_path, block, why):
    folder = copy_source(quantized, tmp_path / "q")
    path = folder / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "quantization": block}))
    with pytest.raises(loading.WeightsError) as error:
        load_model(GlmImageTransformer2DModel, folder / "transformer")
    message = str(error.value)
    assert str(path) in message and why in message and "\n" not in message, message


# ---------------------------------------------------------------------------------------------------------
# 7. A destination that is a file (or a link to nothing): refused before any work; never moved or hidden


@pytest.mark.parametrize("force", [False, True])
def test_a_file_as_destination_is_refused_and_kept(transformer_only, tmp_path, capsys, force):
    dst = tmp_path / "model.safetensors"
    dst.write_text("the user's file")
    code, lines = run_main(capsys, "--hf-path", transformer_only, "--mlx-path", dst, *(["--force"] if force else []))
    assert_one_line(code, lines, f"--mlx-path {dst} is a file, not a folder")
    assert dst.read_text() == "the user's file" and sorted(p.name for p in tmp_path.iterdir()) == [dst.name]


def test_a_dangling_link_as_destination_is_refused_and_kept(transformer_only, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.symlink_to(tmp_path / "elsewhere")
    code, lines = run_main(capsys, "--hf-path", transformer_only, "--mlx-path", dst, "--force")
    assert_one_line(code, lines, f"--mlx-path {dst} is a link to nothing, not a folder")
    assert dst.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_never_replaces_a_file(tmp_path):
    """atomic's swap moves only a folder aside: onto a file it fails, the file where it was."""
    dst = tmp_path / "out"
    dst.write_text("mine")
    with pytest.raises(NotADirectoryError):
        with atomic.replacing(dst, folder=True) as tmp:
            (tmp / "a").write_text("new")
    assert dst.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------------------
# 8. Ctrl-C once the new output is in place: it says so, whenever the signal meets the converter


def test_ctrl_c_just_after_the_swap_says_the_conversion_is_complete(transformer_only, tmp_path, capsys, monkeypatch):
    real = atomic.replacing

    @contextmanager
    def replacing_then_ctrl_c(*args, **kwargs):
        with real(*args, **kwargs) as tmp:
            yield tmp
        raise KeyboardInterrupt  # a Ctrl-C meeting the first bytecode after the swap

    monkeypatch.setattr(atomic, "replacing", replacing_then_ctrl_c)
    out = tmp_path / "out"
    code, lines = run_main(capsys, "--hf-path", transformer_only, "--mlx-path", out)
    assert code == 130 and lines[-1] == f"interrupted; the conversion had finished: {out} is complete", lines
    load_model(GlmImageTransformer2DModel, out / "transformer")


def test_ctrl_c_before_the_swap_says_nothing_was_written(transformer_only, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "copy_tree", interrupted)  # the last step inside the temporary folder
    code, lines = run_main(capsys, "--hf-path", transformer_only, "--mlx-path", tmp_path / "out")
    assert code == 130 and lines[-1] == "interrupted; nothing was written", lines
    assert not (tmp_path / "out").exists() and no_partials(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# 9. The free-space refusal states what the conversion needs, margin included


def test_the_free_space_refusal_states_the_real_need(transformer_only, tmp_path, capsys, monkeypatch):
    import shutil

    planned = C.convert(str(transformer_only), tmp_path / "plan", dry_run=True, verbose=False)
    free = sum(after for _, _, after in planned) + (1 << 20)  # more than the files, less than files + margin
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, free))
    code, lines = run_main(capsys, "--hf-path", transformer_only, "--mlx-path", tmp_path / "out")
    assert_one_line(code, lines, f"has {C.human(free)} free; the conversion needs ", "of files plus a margin of 5% and")
    needed = float(lines[0].split("needs ")[1].split()[0])
    assert needed * 1e6 > free, lines


# ---------------------------------------------------------------------------------------------------------
# 10. A component model_index.json lists as [null, null] (saved as None) is absent by design


def test_a_component_saved_as_none_is_not_required(transformer_only, tmp_path, capsys):
    src = copy_source(transformer_only, tmp_path / "src")
    index = json.loads((src / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps({**index, "vae": [None, None], "processor": [None, None]}))
    code, lines = run_main(capsys, "--hf-path", src, "--mlx-path", tmp_path / "out")
    assert code == 0, lines
    assert (tmp_path / "out" / "transformer" / "config.json").exists()


# ---------------------------------------------------------------------------------------------------------
# 11. A quantization option implies -q


@pytest.mark.parametrize("args,spec", [
    (["--q-bits", "8"], (8, 64, "affine")),
    (["--q-group-size", "32"], (4, 32, "affine")),
    (["--q-mode", "mxfp4"], (4, 32, "mxfp4")),
])
def test_a_quantization_option_implies_q(transformer_only, tmp_path, capsys, args, spec):
    out = tmp_path / "out"
    code, lines = run_main(capsys, "--hf-path", transformer_only, "--mlx-path", out, *args)
    assert code == 0, lines
    q = json.loads((out / "transformer" / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == spec


def test_help_says_quantization_options_imply_q(capsys):
    with pytest.raises(SystemExit):
        C.build_parser().parse_args(["--help"])
    assert "implied by --q-bits, --q-group-size and --q-mode" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------------------------------------------------
# 12. Ctrl-C from the very start: one line, exit 130


def test_ctrl_c_while_main_reads_its_arguments(transformer_only, tmp_path, capsys, monkeypatch):
    def parser():
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "build_parser", parser)
    code, lines = run_main(capsys, "--hf-path", transformer_only, "--mlx-path", tmp_path / "out")
    assert code == 130 and lines == ["interrupted; nothing was written"]


def test_main_meets_ctrl_c_with_its_own_handler(transformer_only, tmp_path, capsys, monkeypatch):
    """Whatever SIGINT handler the entry point set while importing (a deferring one: cli.import_whole), main's is
    the one the conversion runs with. (A SIGINT ignored from the process's start stays ignored: test_signals.py.)"""
    seen = {}

    def summary(*args, **kwargs):
        seen["handler"] = signal.getsignal(signal.SIGINT)

    monkeypatch.setattr(C, "print_summary", summary)
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        code, _ = run_main(capsys, "--hf-path", transformer_only, "--mlx-path", tmp_path / "out")
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert code == 0 and callable(seen["handler"])
    with pytest.raises(KeyboardInterrupt):
        seen["handler"](signal.SIGINT, None)


def test_a_signal_at_any_moment_of_the_converter_is_one_line_and_leaves_nothing(transformer_only, tmp_path):
    """From the moment the entry point (cli.convert) runs: while it imports the converter (MLX, numpy, ...), reads
    its arguments, writes the shards or swaps the folder in, a Ctrl-C or SIGTERM is one line and exit 130 (or the
    conversion had finished), and leaves no partial folder. The moments are the ones the converter reports (its
    imports and file changes), not times: a busy machine sends each signal at the same place."""
    args = lambda out: ["--hf-path", transformer_only, "--mlx-path", out, "--shard-size-gb", "0.00002"]  # noqa: E731
    moments = signal_points.listing("convert", args(tmp_path / "whole"), tmp_path)
    assert "import mlx.core" in moments and any(m.startswith("os.rename") for m in moments)
    chosen = signal_points.spread(moments, 12)
    for i, where in enumerate(chosen):
        out, sig = tmp_path / f"out{i}", (signal.SIGINT, signal.SIGTERM)[i % 2]
        proc = signal_points.interrupted_at("convert", args(out), where, sig, tmp_path)
        case = (where, moments[where - 1], proc.stderr)
        assert "Traceback" not in proc.stderr, case
        assert no_partials(tmp_path), case
        if proc.returncode == 0:  # the signal came after the end: a complete conversion
            assert (out / "model_index.json").exists(), case
            continue
        said = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 130, case
        assert (said == "interrupted; nothing was written" and not out.exists()
                or said == f"interrupted; the conversion had finished: {out} is complete"), case


def test_a_signal_before_the_entry_point_leaves_nothing(transformer_only, tmp_path):
    """Before the command's own code runs (the interpreter importing mlx_glm_image.cli) Python answers a Ctrl-C
    itself, with its traceback; nothing has been made yet, and nothing is left."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        args = ["--hf-path", transformer_only, "--mlx-path", tmp_path / "out"]
        proc = signal_points.before_the_entry_point("convert", args, sig, tmp_path)
        assert proc.returncode in (1, -sig), proc.stderr
        assert not (tmp_path / "out").exists() and no_partials(tmp_path)
