"""Convert a diffusers GLM-Image checkpoint into an MLX model folder, optionally quantized.

    python convert.py --hf-path zai-org/GLM-Image --mlx-path glm-image-4bit -q --q-bits 4

The output mirrors the diffusers layout (one subfolder per component, same config files) so that one loader
reads both; weight files are MLX safetensors shards with an index, and each quantized component's
config.json gains a ``quantization`` block. Tensors stream shard by shard: peak memory stays near one
source shard plus one output shard, not the model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx

from . import atomic, lora
from . import loading as L
from .cli import Parser, above_zero, fail, interrupting, prog_name
from . import quantize as Q
from .conversion import COPIED, ConvertError, Plan, check_free_space, human, scan
from .pipeline.components import MODELS

# The models by folder name (each says which of its layers may be quantized and whether -q picks it by default).
COMPONENTS = MODELS
DEFAULT_SHARD_BYTES = 4 << 30


# ---------------------------------------------------------------------------------------------------------
# Source access: local folder or a Hugging Face repo id (only the needed files are fetched).


def source_root(src: str, components: list[str], headers_only: bool = False) -> Path:
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConvertError(f"{src} is not a folder")
        return path
    if L.is_local(src):
        raise ConvertError(f"{src} does not exist (expected a diffusers folder or a Hugging Face repo id like zai-org/GLM-Image)")
    patterns = ["model_index.json", *(f"{c}/*.json" for c in components)]
    if not headers_only:
        patterns += [f"{c}/*" for c in components] + [f"{c}/*" for c in COPIED]
    return L.fetch(src, patterns)


def present_components(root: Path, wanted: list[str] | None) -> list[str]:
    index = root / "model_index.json"
    if wanted:
        missing = [c for c in wanted if not (root / c).is_dir()]
        if missing:
            raise ConvertError(f"{root} has no component folder {', '.join(missing)}")
        return wanted
    if not index.exists() and (root / "config.json").exists():
        raise ConvertError(f"{root} looks like a single component; pass the pipeline folder (with model_index.json)")
    found = [c for c in COMPONENTS if (root / c).is_dir()]
    if not found:
        raise ConvertError(f"{root} has none of the component folders {', '.join(COMPONENTS)}")
    listed = L.read_config(root, "model_index.json") if index.exists() else {}
    # diffusers writes [null, null] for a component saved as None: absent by design, not missing
    missing = [c for c, v in listed.items() if isinstance(v, list) and any(x is not None for x in v)
               and c in (*COMPONENTS, *COPIED) and not (root / c).is_dir()]
    if missing:
        raise ConvertError(f"{root} lacks {', '.join(f'{c}/' for c in missing)}, which model_index.json lists; "
                           "the output could not generate (pass --components to convert only some)")
    return found


# ---------------------------------------------------------------------------------------------------------
# The output: never the source, assembled in a temporary folder, files as the umask says.


def check_destination(src: Path, dst: Path):
    """Refuse a destination that is the source, lies inside it or contains it (--force would destroy it)."""
    s, d = src.resolve(), dst.expanduser().resolve()
    if d == s or s in d.parents or d in s.parents:
        raise ConvertError(f"--mlx-path {dst} is the source, inside it or contains it; choose another folder")


def check_destination_is_a_folder(dst: Path):
    """Refuse a destination that is there but is no folder: the output is a folder, and --force replaces a folder,
    never a file the user had (nor a link to nothing)."""
    if (dst.exists() or dst.is_symlink()) and not dst.is_dir():
        what = "a file" if dst.exists() else "a link to nothing"
        raise ConvertError(f"--mlx-path {dst} is {what}, not a folder; choose a folder (--force replaces only a folder)")


def remove_stale_partials(dst: Path, verbose: bool) -> None:
    """Folders a killed run left beside ``dst``: removed when their owner process is gone."""
    for old in atomic.remove_stale(dst):
        if verbose:
            print(f"removed {old}, left by an interrupted conversion", file=sys.stderr)


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a folder's files; modes follow the umask (not the source's)."""
    for f in sorted(src.rglob("*")):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)


# ---------------------------------------------------------------------------------------------------------
# Writing: each component by its plan (conversion.py), shard by shard.


def convert_component(plan: Plan, dst: Path, shard_bytes: int, progress) -> tuple[int, int]:
    """Stream one (scanned) component into ``dst``; returns (bytes read, bytes written)."""
    dst.mkdir(parents=True)
    buffer: dict[str, mx.array] = {}
    buffered = read = written = 0
    weight_map: dict[str, str] = {}

    def flush():
        nonlocal buffer, buffered, written
        if not buffer:
            return
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        mx.eval(buffer)
        try:
            mx.save_safetensors(str(dst / name), buffer, metadata={"format": "mlx"})
        except RuntimeError as e:  # MLX's "[write] Unable to write ..." names no cause: a full disk, mostly
            free = human(shutil.disk_usage(dst).free)
            raise ConvertError(f"could not write {dst / name} ({e}); {free} free on that disk") from None
        written += (dst / name).stat().st_size
        for k in buffer:
            weight_map[k] = name
        buffer, buffered = {}, 0

    for f in L.safetensors_files(plan.folder):
        try:
            tensors = mx.load(str(f))
        except Exception as e:
            raise ConvertError(f"cannot read {f}: {e}") from None
        read += f.stat().st_size
        for key, value in plan.model.sanitize(tensors).items():
            value = lora.folded(plan.adapters, key, value)  # before the cast and the quantization, as loading applies them
            if plan.dtype is not None and mx.issubdtype(value.dtype, mx.floating):
                value = value.astype(plan.dtype)
            if plan.is_quantized(key):
                layer = key[: -len(".weight")]
                q = mx.quantize(value, group_size=plan.spec.group_size, bits=plan.spec.bits, mode=plan.spec.mode)
                out = dict(zip(("weight", "scales", "biases"), q))
            else:
                layer, out = key.rpartition(".")[0], {key.rpartition(".")[2]: value}
            for leaf, array in out.items():
                full = f"{layer}.{leaf}" if layer else leaf
                buffer[full] = array
                buffered += array.nbytes
            mx.eval(list(out.values()))
            progress.update(value.nbytes)
            if buffered >= shard_bytes:
                flush()
        del tensors
        mx.clear_cache()
    flush()

    # name the shards as the count is now known
    total = len(set(weight_map.values()))
    renames = {f"model-{i:05d}.safetensors": f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)}
    for old, new in renames.items():
        (dst / old).rename(dst / new)
    index = {"metadata": {"total_size": written, "format": "mlx"}, "weight_map": {k: renames[v] for k, v in sorted(weight_map.items())}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (dst / "config.json").write_text(json.dumps(plan.out_config(), indent=2))
    for extra in plan.folder.iterdir():  # other small files of the component (generation_config.json, ...)
        if extra.suffix == ".json" and extra.name != "config.json" and not extra.name.endswith(".index.json"):
            shutil.copyfile(extra, dst / extra.name)
    return read, written


def convert(
    hf_path: str,
    mlx_path: str | os.PathLike,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str | None = None,
    dtype: str | None = None,
    components: list[str] | None = None,
    quantize_components: list[str] | None = None,
    force: bool = False,
    dry_run: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    verbose: bool = True,
    loras: list[str] | None = None,
) -> list[tuple[str, int, int]]:
    """Convert; returns [(component, bytes before, bytes after)]. Raises ConvertError with a one-line message.
    A quantization option (``q_bits``, ``q_group_size``, ``q_mode``) implies ``quantize``."""
    dst = Path(mlx_path).expanduser()
    quantize = quantize or any(v is not None for v in (q_bits, q_group_size, q_mode))  # never silently dropped
    spec = Q.quant_spec(q_bits, q_group_size, q_mode or "affine") if quantize else None
    out_dtype = L.to_dtype(dtype) if dtype else None
    check_component_names(components, quantize_components, quantize)
    adapters = [lora.parse_with_name(text) for text in loras or []]  # a bad --lora: one line, before any work
    if L.is_local(hf_path) and Path(hf_path).expanduser().exists():
        check_destination(Path(hf_path).expanduser(), dst)
    check_destination_is_a_folder(dst)
    if not dry_run and dst.exists() and not force:
        raise ConvertError(f"{dst} already exists; pass --force to replace it")

    root = source_root(hf_path, components or list(COMPONENTS), headers_only=dry_run)
    check_destination(root, dst)
    names = present_components(root, components)
    q_set = set(quantize_components) if quantize_components is not None else {n for n in names if COMPONENTS[n].quantize_by_default}
    plans = [Plan.make(COMPONENTS[n], root / n, spec if n in q_set else None, out_dtype) for n in names]
    for source, scale, name in adapters:
        adapter = lora.matched(lora.read(source, name, "--lora"), {p.component.component: p.model for p in plans})
        next(p for p in plans if p.component.component == adapter.model).adapters.append((adapter, scale))
    planned = [(plan.component.component, *scan(plan)) for plan in plans]
    if dry_run:
        if verbose:
            print_summary(planned, spec, q_set, planned=True)
        return planned

    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(dst, verbose)
    copied = [root / n for n in COPIED if (root / n).is_dir()]
    check_free_space(dst, sum(p[2] for p in planned) + sum(f.stat().st_size for c in copied for f in c.rglob("*") if f.is_file()))
    committed = []  # set with the swap, signals held: a Ctrl-C from then on finds the output complete
    try:
        summary = write_output(plans, root, names, spec, dst, shard_bytes, verbose, lambda: committed.append(dst))
        if verbose:
            print_summary(summary, spec, q_set)
    except KeyboardInterrupt:
        if committed:
            raise atomic.InterruptedAfterCommit(dst) from None
        raise
    return summary


def check_component_names(components, quantize_components, quantize: bool):
    for c in components or []:
        if c not in COMPONENTS:
            raise ConvertError(f"unknown component {c!r}; expected some of {', '.join(COMPONENTS)}")
    for c in quantize_components or []:
        if c not in COMPONENTS:
            raise ConvertError(f"unknown component {c!r} for --quantize-components; expected some of {', '.join(COMPONENTS)}")
    if quantize_components and not quantize:
        raise ConvertError("--quantize-components needs -q/--quantize")


def write_output(plans, root: Path, names, spec, dst: Path, shard_bytes: int, verbose: bool, on_commit=None):
    """Convert into a temporary folder beside ``dst`` and rename it into place only when complete (atomic.py); an
    existing ``dst`` (--force) is replaced only then, ``on_commit`` running with the swap. Any failure or
    interruption removes the temporary folder."""
    from tqdm import tqdm

    summary = []
    with atomic.replacing(dst, folder=True, on_commit=on_commit) as tmp:
        total = sum(f.stat().st_size for p in plans for f in L.safetensors_files(p.folder))
        with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not verbose, file=sys.stderr) as bar:
            for plan in plans:
                name = plan.component.component
                bar.set_postfix_str(name)
                summary.append((name, *convert_component(plan, tmp / name, shard_bytes, bar)))
        for name in COPIED:
            if (root / name).is_dir():
                copy_tree(root / name, tmp / name)
        if (root / "model_index.json").exists():
            index = L.read_config(root, "model_index.json")
            index["_mlx_glm_image"] = {"converted_components": names, "quantization": spec.as_config() if spec else None}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    return summary


def print_summary(summary, spec, q_set, planned=False):
    what = f"{spec.bits}-bit {spec.mode}, group {spec.group_size}" if spec else "no quantization"
    print(f"\n{'planned' if planned else 'converted'} ({what})")
    print(f"{'component':<26}{'before':>12}{'after':>12}{'ratio':>8}")
    for name, before, after in summary:
        note = "" if name in q_set or spec is None else f"   (full precision: {COMPONENTS[name].full_precision_note})"
        print(f"{name:<26}{human(before):>12}{human(after):>12}{after / max(before, 1):>8.2f}{note}")
    b, a = sum(s[1] for s in summary), sum(s[2] for s in summary)
    print(f"{'total':<26}{human(b):>12}{human(a):>12}{a / max(b, 1):>8.2f}")


def build_parser() -> argparse.ArgumentParser:
    prog = prog_name("python convert.py")
    p = Parser(
        prog=prog,
        description="Convert a diffusers GLM-Image checkpoint (folder or Hugging Face repo id) to MLX, optionally quantized.",
        epilog=f"Example: {prog} --hf-path zai-org/GLM-Image --mlx-path glm-image-4bit -q --q-bits 4",
    )
    p.add_argument("--hf-path", required=True, help="diffusers pipeline folder or Hugging Face repo id")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    p.add_argument("-q", "--quantize", action="store_true",
                   help="quantize the matmul weights of the quantized components (implied by --q-bits, --q-group-size "
                        "and --q-mode)")
    p.add_argument("--q-bits", type=int, choices=Q.BITS, help="bits per weight (default 4; mxfp8: 8)")
    p.add_argument("--q-group-size", type=int, choices=[16, 32, 64, 128], help="weights sharing one scale (default 64 affine, 32 mxfp, 16 nvfp4)")
    p.add_argument("--q-mode", choices=list(Q.MODES), help="quantization mode (default affine)")
    p.add_argument("--dtype", choices=list(L.DTYPES), help="cast floating weights (default: keep the checkpoint's)")
    p.add_argument("--components", nargs="+", metavar="NAME", help=f"convert only these ({', '.join(COMPONENTS)})")
    p.add_argument(
        "--quantize-components", nargs="*", metavar="NAME",
        help="components to quantize with -q (default: transformer vision_language_encoder; text_encoder and vae stay full precision)",
    )
    p.add_argument("--shard-size-gb", type=above_zero("GB"), default=DEFAULT_SHARD_BYTES / 2**30, help="output shard size (default 4)")
    p.add_argument("--force", action="store_true", help="replace an existing --mlx-path (only once the new one is complete)")
    p.add_argument("--dry-run", action="store_true", help="print planned sizes from the safetensors headers; read no weights")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE][@NAME]",
                   help="fold a LoRA adapter into the weights (before quantizing) at SCALE (a finite number, default "
                        "1), recorded in the component's config as NAME (default: its file's or folder's name); "
                        "repeat for several")
    return p


def main(argv: list[str] | None = None) -> int:
    try:  # from the first line: a Ctrl-C while the arguments are read is one line too
        with interrupting():
            args = build_parser().parse_args(argv)
            convert(
                args.hf_path, args.mlx_path, quantize=args.quantize, q_bits=args.q_bits, q_group_size=args.q_group_size,
                q_mode=args.q_mode, dtype=args.dtype, components=args.components,
                quantize_components=args.quantize_components, force=args.force, dry_run=args.dry_run,
                shard_bytes=int(args.shard_size_gb * 2**30), loras=args.lora,
            )
    except (ConvertError, L.WeightsError, Q.QuantizeError, lora.LoraError, OSError) as e:  # OSError: disk full, permissions
        return fail(e)
    except atomic.InterruptedAfterCommit as e:
        print(f"interrupted; the conversion had finished: {e.dst} is complete", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    from .cli import done

    sys.exit(done(main()))
