"""What an adapter brings in, checked where it enters (issue 33, defects 1-4): every field of its config and of its
file's metadata, its tensors, the scales of the flag, the Python API and the metadata, its name and its source.
Each bad input is one line naming the adapter (after the flag that gave it) and the field, before any model loads;
the valid fields read as PEFT and diffusers read them (their own LoRA layers are the reference)."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from commands import assert_one_line, cli, cli_ok, run
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.numpy import save_file

from mlx_glm_image import lora, metadata
from mlx_glm_image.pipeline import GlmImagePipeline

AR_LAYER = "model.language_model.layers.0.self_attn.q_proj"  # a linear layer of the tiny AR model: 32 -> 32
DIT_LAYER = "transformer_blocks.0.attn1.to_q"  # and of the tiny DiT: 32 -> 32
FAST = ["--prompt", 'a red cat "big"', "--height", 64, "--width", 96, "--steps", 2, "--seed", 3, "--top-k", 1,
        "--dtype", "float32", "--quiet"]


class Toy(torch.nn.Module):
    """Module paths like a model's blocks (blocks.N.q, blocks.N.v), for PEFT's own layers to say their scaling."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"q": torch.nn.Linear(6, 6), "v": torch.nn.Linear(6, 6)})
                                          for _ in range(2))


@pytest.fixture(scope="module")
def peft_toy(tmp_path_factory):
    """An adapter PEFT saved (save_pretrained) with r, lora_alpha, rank_pattern, alpha_pattern and rsLoRA all in use,
    and PEFT's scaling of each of its layers."""
    torch.manual_seed(0)
    model = get_peft_model(Toy(), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], use_rslora=True,
                                             rank_pattern={"blocks.1.q": 2}, alpha_pattern={"v": 3},
                                             init_lora_weights=False))
    out = tmp_path_factory.mktemp("peft-toy")
    model.save_pretrained(out)
    scalings = {name.removeprefix("base_model.model."): m.scaling["default"] for name, m in model.named_modules()
                if hasattr(m, "scaling") and "default" in getattr(m, "scaling", {})}
    return out, scalings


def copy_with(folder, tmp_path, **changes):
    """The adapter folder copied, its adapter_config.json with ``changes`` (a value of ``...``: the key removed)."""
    out = tmp_path / "adapter"
    shutil.copytree(folder, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(changes)
    (out / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))
    return out


def refused(source, *fragments, origin="--lora"):
    """lora.read refuses ``source`` in one line that names the flag, the adapter and each of ``fragments``."""
    with pytest.raises(lora.LoraError) as caught:
        lora.read(str(source), origin=origin)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{origin} {source}"), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def write_pair(path, a=None, b=None, extra=None, metadata_=None, layer=DIT_LAYER):
    """A diffusers-style adapter file: one lora_A/lora_B pair (random, rank 4) and any ``extra`` tensors."""
    rng = np.random.default_rng(0)
    tensors = {f"{layer}.lora_A.weight": rng.standard_normal((4, 32)).astype(np.float32) if a is None else a,
               f"{layer}.lora_B.weight": rng.standard_normal((32, 4)).astype(np.float32) if b is None else b,
               **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata_)
    return path


# -- defect 1: every field read from an adapter -----------------------------------------------------------------


def test_the_fields_read_as_peft_reads_them(peft_toy):
    """r, lora_alpha, rank_pattern, alpha_pattern and use_rslora of PEFT's own file give PEFT's own scaling."""
    folder, scalings = peft_toy
    adapter = lora.read(str(folder))
    assert {m: s for m, (_, _, s) in adapter.layers.items()} == pytest.approx(scalings)
    assert scalings["blocks.1.q"] == pytest.approx(8 / math.sqrt(2)) and scalings["blocks.0.v"] == pytest.approx(3 / 2)


def test_a_config_without_lora_alpha_takes_peft_default(peft_toy, tmp_path):
    """PEFT reads an adapter_config.json without lora_alpha with LoraConfig's default (8), not alpha = r."""
    from peft import PeftConfig

    folder = copy_with(peft_toy[0], tmp_path, lora_alpha=..., alpha_pattern={}, use_rslora=False)
    peft_alpha = PeftConfig.from_pretrained(str(folder)).lora_alpha
    scalings = {m: s for m, (_, _, s) in lora.read(str(folder)).layers.items()}
    assert scalings["blocks.0.q"] == pytest.approx(peft_alpha / 4) and scalings["blocks.1.q"] == pytest.approx(peft_alpha / 2)


BAD_FIELDS = [  # (field, value, what the line says)
    ("r", "4", "r in adapter_config.json must be an integer >= 1, got the string '4'"),
    ("r", 0, "an integer >= 1, got 0"),
    ("r", 4.5, "an integer >= 1"),
    ("r", None, "got null"),
    ("r", 8, "has rank 4, its LoRA config says 8"),
    ("lora_alpha", "eight", "lora_alpha in adapter_config.json must be a finite number, got the string 'eight'"),
    ("lora_alpha", None, "lora_alpha in adapter_config.json must be a finite number, got null"),
    ("lora_alpha", True, "must be a finite number, got true"),
    ("lora_alpha", float("nan"), "must be a finite number, got nan"),
    ("lora_alpha", 10**400, "must be a finite number"),
    ("lora_alpha", [8], "must be a finite number, got a list"),
    ("use_rslora", "no", "use_rslora in adapter_config.json must be true or false, got the string 'no'"),
    ("use_rslora", 0, "must be true or false, got 0"),
    ("use_rslora", None, "must be true or false, got null"),
    ("rank_pattern", "x", "rank_pattern in adapter_config.json must be an object"),
    ("rank_pattern", [1], "rank_pattern in adapter_config.json must be an object"),
    ("rank_pattern", {"(": 2}, "'(' in rank_pattern in adapter_config.json is not a regular expression"),
    ("rank_pattern", {"blocks.1.q": "2"}, "rank_pattern['blocks.1.q'] in adapter_config.json must be an integer >= 1"),
    ("rank_pattern", {"blocks.1.q": 0}, "must be an integer >= 1, got 0"),
    ("rank_pattern", {"blocks.1.q": 3}, "blocks.1.q has rank 2, its LoRA config says 3"),
    ("alpha_pattern", "x", "alpha_pattern in adapter_config.json must be an object (module pattern: alpha), got the "
                           "string 'x'"),
    ("alpha_pattern", {"(": 2}, "'(' in alpha_pattern in adapter_config.json is not a regular expression"),
    ("alpha_pattern", {"v": "3"}, "alpha_pattern['v'] in adapter_config.json must be a finite number, got the string"),
    ("alpha_pattern", {"v": float("inf")}, "alpha_pattern['v'] in adapter_config.json must be a finite number, got inf"),
    ("target_modules", 5, "target_modules in adapter_config.json must be a list of module names or a regular expr"),
    ("target_modules", ["q", 1], "target_modules in adapter_config.json must be"),
    ("target_modules", "(q", "'(q' in target_modules in adapter_config.json is not a regular expression"),
    ("layers_to_transform", "0", "layers_to_transform in adapter_config.json must be a block number or a list"),
    ("layers_to_transform", [0, -1], "layers_to_transform in adapter_config.json must be"),
    ("layers_to_transform", [True], "layers_to_transform in adapter_config.json must be"),
    ("layers_pattern", 3, "layers_pattern in adapter_config.json must be a name or a list of names, got 3"),
    ("modules_to_save", "lm_head", "modules_to_save in adapter_config.json must be a list of module names"),
    ("modules_to_save", ["lm_head"], "modules_to_save) are not supported"),
    ("use_dora", "false", "use_dora in adapter_config.json must be true or false"),
    ("use_dora", True, "DoRA adapters are not supported (use_dora in adapter_config.json)"),
    ("lora_bias", True, "LoRA-bias adapters are not supported"),
    ("alora_invocation_tokens", [1, 2], "activated-LoRA (aLoRA) adapters are not supported"),
    ("layer_replication", [[0, 1]], "layer-replicating adapters are not supported"),
    ("target_parameters", ["w"], "parameter-targeting (target_parameters) adapters are not supported"),
    ("peft_type", "LOHA", 'peft_type in adapter_config.json must be "LORA"'),
]


@pytest.mark.parametrize("key,value,said", BAD_FIELDS, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_FIELDS])
def test_every_config_field_is_checked(peft_toy, tmp_path, key, value, said):
    refused(copy_with(peft_toy[0], tmp_path, **{key: value}), said)


@pytest.mark.parametrize("text,said", [("[1, 2]", "adapter_config.json must be a JSON object, got a list"),
                                       ('"r"', "must be a JSON object, got the string 'r'"),
                                       ("7", "must be a JSON object, got 7"),
                                       ("{", "adapter_config.json is not valid JSON")])
def test_a_config_that_is_not_an_object(peft_toy, tmp_path, text, said):
    folder = copy_with(peft_toy[0], tmp_path)
    (folder / "adapter_config.json").write_text(text)
    refused(folder, said)
    (folder / "adapter_config.json").write_bytes(b'{"r": "\xff"}')
    refused(folder, "cannot read adapter_config.json")


@pytest.mark.parametrize("meta,said", [
    ("[1, 2]", "the lora_adapter_metadata of pytorch_lora_weights.safetensors must be a JSON object, got a list"),
    ('{"lora_alpha": "eight"}', "lora_alpha in the lora_adapter_metadata of pytorch_lora_weights.safetensors must be a"),
    ('{"r": 4, "lora_alpha": null}', "lora_alpha in the lora_adapter_metadata"),
    ('{"alpha_pattern": {"(": 2}}', "is not a regular expression"),
    ('{"transformer.lora_alpha": "eight"}', "lora_alpha in the lora_adapter_metadata"),  # a pipeline's, prefixed
    ("nope", "is not valid JSON")])
def test_a_diffusers_files_metadata_is_checked(tmp_path, meta, said):
    path = write_pair(tmp_path / "style" / "pytorch_lora_weights.safetensors", metadata_={"lora_adapter_metadata": meta})
    refused(path, said)


def nan_at(shape, index):
    values = np.ones(shape, np.float32)
    values[index] = np.nan
    return values


BAD_TENSORS = [  # (tensors beside or instead of the pair, what the line says)
    (dict(extra={f"{DIT_LAYER}.alpha": np.zeros((0,), np.float32)}), f"{DIT_LAYER}.alpha must be one number"),
    (dict(extra={f"{DIT_LAYER}.alpha": np.ones((2,), np.float32)}), "must be one number, it is float32 of shape (2,)"),
    (dict(extra={f"{DIT_LAYER}.alpha": np.array(np.nan, np.float32)}), f"{DIT_LAYER}.alpha must be a finite number"),
    (dict(extra={f"{DIT_LAYER}.alpha": np.array(True)}), "must be one number"),
    (dict(a=np.ones((4, 32), np.int32)), f"{DIT_LAYER}.lora_A.weight is int32, not a float"),
    (dict(b=nan_at((32, 4), (3, 1))), f"{DIT_LAYER}.lora_B.weight holds NaN or infinite values"),
    (dict(a=np.full((4, 32), np.inf, np.float32)), f"{DIT_LAYER}.lora_A.weight holds NaN or infinite values"),
    (dict(a=np.zeros((0, 32), np.float32), b=np.zeros((32, 0), np.float32)), "which are not a low-rank pair"),
    (dict(a=np.ones((4,), np.float32)), "which are not a low-rank pair"),
    (dict(extra={f"transformer.{DIT_LAYER}.lora_A.weight": np.ones((4, 32), np.float32)}),
     f"{DIT_LAYER} has two lora_A weights"),
    (dict(extra={f"{DIT_LAYER}.lora_down.weight": np.ones((4, 32), np.float32)}), "has two lora_A weights"),
    (dict(extra={f"{DIT_LAYER}.alpha": np.array(2.0, np.float32),
                 f"transformer.{DIT_LAYER}.alpha": np.array(2.0, np.float32)}), f"{DIT_LAYER} has two .alpha tensors"),
]


@pytest.mark.parametrize("tensors,said", BAD_TENSORS, ids=[s[:40] for _, s in BAD_TENSORS])
def test_every_tensor_is_checked(tmp_path, tensors, said):
    refused(write_pair(tmp_path / "bad.safetensors", **tensors), said)


def test_a_kohya_alpha_and_a_pipelines_prefixed_metadata_are_read(tmp_path):
    """A ``.alpha`` gives alpha / r; a pipeline's save_lora_weights prefixes its metadata keys with the component
    (diffusers' _pack_dict_with_prefix), and its loader reads them stripped: so do we."""
    from diffusers.loaders.lora_base import _pack_dict_with_prefix

    alpha = {f"{DIT_LAYER}.alpha": np.array(2.0, np.float32)}
    kohya = lora.read(str(write_pair(tmp_path / "k.safetensors", extra=alpha)))
    assert kohya.layers[DIT_LAYER][2] == 0.5
    packed = _pack_dict_with_prefix({"r": 4, "lora_alpha": 12, "use_rslora": True}, "transformer")
    path = write_pair(tmp_path / "p.safetensors", metadata_={"lora_adapter_metadata": json.dumps(packed)})
    assert lora.read(str(path)).layers[DIT_LAYER][2] == 6.0  # 12 / sqrt(4)


# -- defect 2: scales -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,said", [("x:nan", "got nan"), ("x:inf", "got inf"), ("x:-inf", "got -inf"),
                                       ("x:1e400", "got 1e400"), ("x:nan@n", "got nan")])
def test_a_flags_scale_is_a_finite_number(text, said):
    with pytest.raises(lora.LoraError, match=f"^--lora {text}: the scale must be a finite number, {said}$"):
        lora.parse_with_name(text)


def test_the_apis_scales_are_finite_numbers(model_dir, tmp_path):
    path = write_pair(tmp_path / "s.safetensors")
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32")
    for scale, said in [("1", "the string '1'"), (math.nan, "nan"), (math.inf, "inf"), (True, "true"), (None, "null")]:
        with pytest.raises(lora.LoraError, match=f"^scale must be a finite number, got {said}$"):
            pipe.load_lora_weights(path, scale=scale)
    assert pipe.components.adapters.names() == [], "refused before it was read"
    pipe.load_lora_weights(path, adapter_name="s", scale=-0.5)
    for weight, said in [(math.nan, "nan"), ("1", "the string '1'"), (False, "false"), ({"a": 1}, "an object")]:
        with pytest.raises(lora.LoraError, match=f"^the weight of adapter 's' must be a finite number, got {said}$"):
            pipe.set_adapters(["s"], [weight])
    assert pipe.components.adapters.weights == {"s": -0.5}, "a refused weight changes nothing"


@pytest.mark.parametrize("entry,said", [
    ({"source": "x", "scale": "1"}, "lora[0].scale must be a finite number, got the string '1'"),
    ({"source": "x"}, "lora[0].scale must be a finite number, got null"),
    ({"source": "x", "scale": True}, "lora[0].scale must be a finite number, got true"),
    ({"scale": 1}, "lora[0].source must be text, got null"),
    ({"source": "x", "scale": 1, "name": 3}, "lora[0].name must be text, got 3"),
    ("x", "lora[0] must be an object, got the string 'x'")])
def test_a_records_scale_is_checked_when_read(tmp_path, entry, said):
    (tmp_path / "r.json").write_text(json.dumps({"prompt": "a cat", "lora": [entry]}))
    message = f"--config-from-metadata {tmp_path / 'r.json'}: {said}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        metadata.read(str(tmp_path / "r.json"))
    (tmp_path / "nan.json").write_text('{"prompt": "a cat", "lora": [{"source": "x", "scale": NaN}]}')
    with pytest.raises(ValueError, match="lora\\[0\\].scale must be a finite number, got nan"):
        metadata.read(str(tmp_path / "nan.json"))


def test_scales_refused_before_any_work_by_every_command(tmp_path):
    """The CLI, the server and the converter: one line, before the model (which does not exist) is looked at."""
    for command, args in [("generate", ["-m", tmp_path / "no-model", "--prompt", "a cat"]),
                          ("server", ["-m", tmp_path / "no-model"]),
                          ("convert.py", ["--hf-path", tmp_path / "no-model", "--mlx-path", tmp_path / "out"])]:
        for scale in ("nan", "inf", "1e400"):
            proc = run(command, *args, "--lora", f"x:{scale}", timeout=120)
            assert_one_line(proc, f"--lora x:{scale}: the scale must be a finite number, got {scale}")
    assert not (tmp_path / "out").exists()


def test_a_metadata_scale_refused_before_any_model(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"prompt": "a cat", "model": str(tmp_path / "no-model"),
                                                 "lora": [{"source": "x", "scale": "1"}]}))
    assert_one_line(cli("--config-from-metadata", tmp_path / "r.json"), "lora[0].scale must be a finite number")


# -- defect 3: adapters by file: names, empty paths, the flag in every message ------------------------------------


def test_generic_files_are_named_by_their_folders_and_names_are_unique(model_dir, tmp_path):
    a = write_pair(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = write_pair(tmp_path / "b" / "pytorch_lora_weights.safetensors", a=np.full((4, 32), 0.5, np.float32))
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32")
    assert [pipe.load_lora_weights(p) for p in (a, b, a.parent, b)] == ["a", "b", "a_2", "b_2"]
    assert pipe.load_lora_weights(write_pair(tmp_path / "style.safetensors")) == "style"
    assert pipe.load_lora_weights(b, adapter_name="mine") == "mine"
    with pytest.raises(lora.LoraError, match="^adapter .*: an adapter named 'mine' is loaded already; give it anoth"):
        pipe.load_lora_weights(a, adapter_name="mine")
    assert lora.parse_with_name(f"{a}:0.5@first") == (str(a), 0.5, "first")


@pytest.mark.parametrize("text,said", [("", "--lora '': the path is empty"), (":0.5", "--lora :0.5: the path is empty"),
                                       ("@n", "--lora @n: the path is empty"),
                                       ("x@", "--lora x@: the name after @ is empty")])
def test_an_empty_path_or_name(text, said):
    with pytest.raises(lora.LoraError, match=f"^{said}$"):
        lora.parse_with_name(text)


def test_every_message_names_what_gave_the_adapter(tmp_path, model_dir):
    """lora.read says the flag (or the API's "adapter", or the metadata) before the source, on every path."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "two").mkdir()
    write_pair(tmp_path / "two" / "x.safetensors")
    write_pair(tmp_path / "two" / "y.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    for origin in ("--lora", "adapter", "--config-from-metadata a.png: adapter"):
        assert refused("nope", origin=origin) == f"{origin} nope does not exist (expected a local folder or file, " \
                                                 "or a Hugging Face repo id like org/name)"
        assert refused(tmp_path / "none", origin=origin) == f"{origin} {tmp_path / 'none'} does not exist"
        refused(tmp_path / "empty", "no adapter_model.safetensors or pytorch_lora_weights.safetensors", origin=origin)
        refused(tmp_path / "two", "several .safetensors files in it", origin=origin)
        refused(tmp_path / "junk.safetensors", "cannot read junk.safetensors", origin=origin)
        refused(tmp_path / "other.safetensors", "w is not a LoRA weight", origin=origin)
        with pytest.raises(lora.LoraError, match=f"^{origin} '': the path is empty$"):
            lora.read("", origin=origin)
    adapter = lora.read(str(write_pair(tmp_path / "far.safetensors", layer="nowhere.q")), origin="--lora")
    pipe = GlmImagePipeline.from_pretrained(model_dir, dtype="float32")
    with pytest.raises(lora.LoraError, match=f"^--lora {tmp_path / 'far.safetensors'}: its target modules fit no"):
        pipe.components.adapters.add(adapter)


def test_the_cli_the_server_and_the_converter_refuse_bad_adapters_in_one_line(model_dir, peft_toy, tmp_path):
    listed = copy_with(peft_toy[0], tmp_path)
    (listed / "adapter_config.json").write_text("[1, 2]")
    nan = write_pair(tmp_path / "nan.safetensors", b=nan_at((32, 4), (0, 0)))
    for command, args in [("generate", ["-m", model_dir, *FAST, "--output", tmp_path / "never.png"]),
                          ("server", ["-m", model_dir]),
                          ("convert.py", ["--hf-path", model_dir, "--mlx-path", tmp_path / "out"])]:
        proc = run(command, *args, "--lora", listed, timeout=120)
        assert_one_line(proc, f"--lora {listed}: adapter_config.json must be a JSON object, got a list")
        proc = run(command, *args, "--lora", nan, timeout=120)
        assert_one_line(proc, f"--lora {nan}: {DIT_LAYER}.lora_B.weight holds NaN or infinite values")
    assert_one_line(cli("-m", model_dir, *FAST, "--lora", "nope"), "--lora nope does not exist")
    assert_one_line(cli("-m", model_dir, *FAST, "--lora", "", cwd=tmp_path), "--lora '': the path is empty")
    assert not (tmp_path / "never.png").exists() and not (tmp_path / "out").exists()


# -- defects 3 and 4 end to end: two generic files, named; regenerated from another folder --------------------------


def dit_pair(path, seed):
    """A real-sized pair for the tiny DiT (its q projection, 32 -> 32), strong enough to change the image."""
    rng = np.random.default_rng(seed)
    return write_pair(path, a=rng.standard_normal((4, 32)).astype(np.float32),
                      b=rng.standard_normal((32, 4)).astype(np.float32))


def test_two_generic_files_by_relative_paths_regenerate_from_another_folder(model_dir, tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    dit_pair(work / "one" / "pytorch_lora_weights.safetensors", 1)
    dit_pair(work / "two" / "pytorch_lora_weights.safetensors", 2)
    cli_ok("-m", model_dir, *FAST, "--lora", "one/pytorch_lora_weights.safetensors:0.5",
           "--lora", "two/pytorch_lora_weights.safetensors@second", "--output", "a.png", cwd=work)
    records = json.loads(Image.open(work / "a.png").text["glm-image"])["lora"]
    assert [(r["name"], r["scale"], r["source"], r["source_given"]) for r in records] == [
        ("one", 0.5, str(work / "one" / "pytorch_lora_weights.safetensors"), "one/pytorch_lora_weights.safetensors"),
        ("second", 1.0, str(work / "two" / "pytorch_lora_weights.safetensors"), "two/pytorch_lora_weights.safetensors")]
    cli_ok("--config-from-metadata", work / "a.png", "--output", "again.png", "--quiet", cwd=elsewhere)
    assert np.array_equal(np.asarray(Image.open(elsewhere / "again.png")), np.asarray(Image.open(work / "a.png")))
    cli_ok("-m", model_dir, *FAST, "--output", "plain.png", cwd=work)
    assert not np.array_equal(np.asarray(Image.open(work / "plain.png")), np.asarray(Image.open(work / "a.png")))
    shutil.rmtree(work / "two")
    gone = work / "two" / "pytorch_lora_weights.safetensors"
    assert_one_line(cli("--config-from-metadata", work / "a.png", "--output", "never.png", cwd=elsewhere),
                    f"--config-from-metadata {work / 'a.png'}: adapter {gone} does not exist")


# -- defect 4: an adapter folded in already ------------------------------------------------------------------------


def test_an_adapter_folded_in_already_is_refused(model_dir, tmp_path):
    from mlx_glm_image.convert import convert

    folded, other = dit_pair(tmp_path / "style.safetensors", 1), dit_pair(tmp_path / "other.safetensors", 2)
    convert(str(model_dir), tmp_path / "baked", loras=[f"{folded}:0.6@style"], verbose=False)
    (recorded,) = json.loads((tmp_path / "baked" / "transformer" / "config.json").read_text())["lora"]
    assert (recorded["name"], recorded["source"], recorded["scale"]) == ("style", str(folded), 0.6)
    pipe = GlmImagePipeline.from_pretrained(tmp_path / "baked", dtype="float32")
    with pytest.raises(lora.LoraError, match=f"^adapter {folded}: the transformer of .*baked has this adapter folded in "
                                             "already \\(convert --lora\\); loading it again would apply it twice$"):
        pipe.load_lora_weights(folded)
    assert pipe.load_lora_weights(other) == "other"
    assert_one_line(cli("-m", tmp_path / "baked", *FAST, "--lora", folded, "--output", tmp_path / "never.png"),
                    f"--lora {folded}: the transformer of {tmp_path / 'baked'} has this adapter folded in already")
    assert not (tmp_path / "never.png").exists()
