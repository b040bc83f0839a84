"""Every command of README.md and docs/*.md runs as written, and every path they name exists.

What runs: each ```bash block's commands (a line and its `\\` continuations; comment lines dropped) and each
```python block (as one script), in the order of their file, in a working folder of that file's own, with bash,
this venv's commands on the PATH. Each must exit 0 without a traceback. The working folder holds what the docs call
the model, as links to the tiny checkpoint the other tests read (conftest's model_dir): `zai-org/GLM-Image`
(a local folder by that name is read as one, never fetched), `GLM-Image` and `glm-image-4bit`, unless a command of
that file makes the folder itself (`--mlx-path NAME`: the README's quick start converts `glm-image-4bit`). It also
holds the files of yours the docs name: `photo.jpg` (128x96) and `prompts.jsonl` (two 64x64 images of 4 steps).
`mlx-glm-image-server` runs until it answers GET /health, then gets SIGINT and must exit 0.

What does not run, and why:
- from a line `# needs: ...` to the end of its block, what that line names: the released model (the tiny model takes
  128 px a side at most, and a 1024 px image takes minutes on this CPU), a Mac or several, a server running the
  released model, adapters of yours. These are still parsed by their command's own argument parser (shell) or
  compiled (Python), so a renamed flag or a typo fails here.
- `pip install ...`: it installs packages; CI runs the README's test command itself (.ci/run).
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from commands import ROOT
from PIL import Image

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MODELS = ("zai-org/GLM-Image", "GLM-Image", "glm-image-4bit")
NEEDS = "# needs:"
OURS = {"mlx-glm-image": "generate", "mlx-glm-image-convert": "convert", "mlx-glm-image-server": "server",
        "mlx-glm-image-train": "train.command", "mlx-glm-image-eval": "eval.command"}
MODULES = {f"mlx_glm_image.{module}": command for command, module in OURS.items()}  # python -m ...


@dataclass(frozen=True)
class Command:
    doc: Path
    line: int
    language: str  # "bash" or "python"
    text: str
    needs: str | None  # what it needs beyond this repository, when it cannot run here

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(text: str):
    """(language, first line number, lines) of each fenced code block ("" for a block that names none)."""
    language, start, lines = None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if language is None and line.startswith("```"):
            language, start, lines = line[3:].strip(), number + 1, []
        elif language is not None and line.startswith("```"):
            yield language, start, lines
            language = None
        elif language is not None:
            lines.append(line)


def marker(line: str) -> str | None:
    """What a `# needs: ...` line names."""
    return line.strip()[len(NEEDS):].strip() if line.strip().startswith(NEEDS) else None


def commands(doc: Path) -> list[Command]:
    found = []
    for language, start, lines in blocks(doc.read_text()):
        if language == "python":
            found.append(Command(doc, start, "python", "\n".join(lines), next(filter(None, map(marker, lines)), None)))
        if language != "bash":
            continue
        needed, pending = None, None
        for number, line in enumerate(lines, start):
            needed = marker(line) or needed
            if pending is None and (not line.strip() or line.strip().startswith("#")):
                continue
            pending = (pending[0], pending[1] + "\n" + line) if pending else (number, line)
            if not line.endswith("\\"):
                found.append(Command(doc, pending[0], "bash", pending[1], needed))
                pending = None
    return found


ALL = [c for doc in DOCS for c in commands(doc)]


def parse(command: Command):
    """A command that does not run here is still checked: each of our commands by its own parser, Python compiled."""
    if command.language == "python":
        compile(command.text, command.id, "exec")
        return
    words = shlex.split(command.text.replace("\\\n", " "), comments=True)
    simple = [[]]
    for word in words:
        if word in ("&&", "|", ";", "||"):
            simple.append([])
        else:
            simple[-1].append(word)
    for argv in simple:
        if argv[:1] == ["mlx.launch"]:
            argv = argv[argv.index("--") + 1:]
        if argv[:2] == ["python", "convert.py"]:
            argv = ["mlx-glm-image-convert", *argv[2:]]
        if argv[:2] == ["python", "-m"] and argv[2] in MODULES:
            argv = [MODULES[argv[2]], *argv[3:]]
        if argv and argv[0] in OURS:
            module = __import__(f"mlx_glm_image.{OURS[argv[0]]}", fromlist=["build_parser"])
            try:
                module.build_parser().parse_args(argv[1:])
            except SystemExit as e:
                assert e.code == 0, f"{command.id}: {argv[0]} refuses its arguments: {command.text}"


@pytest.fixture(scope="session")
def folders(tmp_path_factory, model_dir) -> Callable[[Path], Path]:
    """Each doc's working folder, made on first use: the models it reads and the files of yours it names."""
    made = {}

    def folder(doc: Path) -> Path:
        if doc not in made:
            here = made[doc] = tmp_path_factory.mktemp(doc.stem)
            written = {m for c in commands(doc) for m in re.findall(r"--mlx-path\s+(\S+)", c.text)}
            for name in set(MODELS) - written:
                (here / name).parent.mkdir(parents=True, exist_ok=True)
                (here / name).symlink_to(model_dir, target_is_directory=True)
            rng = np.random.default_rng(0)
            Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(here / "photo.jpg")
            (here / "prompts.jsonl").write_text('{"prompt": "a red cat", "size": "64x64", "steps": 4}\n'
                                                '{"prompt": "a blue sky", "size": "64x64", "steps": 4}\n')
        return made[doc]

    return folder


def environment() -> dict:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def serve(command: Command, here: Path):
    """A server command runs until it answers /health; SIGINT then stops it."""
    port = re.search(r"--port\s+(\d+)", command.text)
    url = f"http://127.0.0.1:{port.group(1) if port else 8000}/health"
    proc = subprocess.Popen(["bash", "-c", f"exec {command.text}"], cwd=here, env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, f"{command.id}: the server stopped: {proc.communicate()[1]}"
            try:
                with urllib.request.urlopen(url, timeout=1) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert time.time() < deadline, f"{command.id}: no answer at {url}"
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, f"{command.id}: exit {proc.returncode}\n{err}"


@pytest.mark.parametrize("command", ALL, ids=[c.id for c in ALL])
def test_doc_command_runs_as_written(command, folders):
    if command.language == "bash" and command.text.startswith("pip install "):
        pytest.skip("installs packages; CI runs the README's test command (.ci/run)")
    if command.needs:
        parse(command)
        pytest.skip(f"needs {command.needs}")
    here = folders(command.doc)
    if command.language == "bash" and command.text.startswith("mlx-glm-image-server"):
        serve(command, here)
        return
    argv = ["bash", "-c", command.text] if command.language == "bash" else [sys.executable, "-c", command.text]
    proc = subprocess.run(argv, cwd=here, env=environment(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (
        f"{command.id}: exit {proc.returncode}\n$ {command.text}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


# -- the paths the docs name --------------------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_links_and_named_files_exist(doc):
    text = doc.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            missing.append(target)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
            if anchor not in {slug(h.replace("`", "")) for h in headings}:
                missing.append(target)
    # a path of this repository in backticks: a module, a test, a benchmark, a doc
    for name in re.findall(r"`((?:mlx_glm_image|pipeline|models|tests|benchmarks|examples|docs)/[\w/.*-]+)", text):
        candidates = [ROOT / name, ROOT / "mlx_glm_image" / name, ROOT / "benchmarks" / name]
        if not any(list(c.parent.glob(c.name)) for c in candidates):
            missing.append(name)
    assert not missing, f"{doc.name} names what does not exist: {missing}"


def test_the_module_list_is_the_package():
    """docs/architecture.md's module list names every module of mlx_glm_image/, and only those."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    tree = next(lines for _, _, lines in blocks(text) if lines and lines[0] == "mlx_glm_image/")
    files, folders, parents = set(), set(), []
    for line in tree[1:]:
        indent = len(line) - len(line.lstrip())
        if indent >= 20 or not line.strip():
            continue  # a description's second line
        parents = parents[:indent // 2 - 1]
        for name in re.split(r",\s*", re.split(r"\s{2,}", line.strip())[0]):
            path = "/".join([*parents, name.rstrip("/")])
            if name.endswith("/"):
                folders.add(path)
                parents.append(name.rstrip("/"))
            else:
                files.add(path)
    package = ROOT / "mlx_glm_image"
    actual = {str(p.relative_to(package)) for p in package.rglob("*") if p.suffix in (".py", ".html")
              and p.name != "__init__.py" and "__pycache__" not in p.parts}
    # a folder listed without its files stands for all of them
    whole = {f for f in folders if not any(x.startswith(f + "/") for x in files | folders)}
    unlisted = {a for a in actual if a not in files and not any(a.startswith(f + "/") for f in whole)}
    assert not unlisted, f"not in the module list: {sorted(unlisted)}"
    listed = files | folders
    stale = {p for p in listed if not (package / p).exists()}
    assert not stale, f"the module list names what does not exist: {sorted(stale)}"

