"""Ready the GPU check for a bare, offline GPU machine, from this one: `bash bench/gpu_check.sh --prepare`.

The GPU machine this project is checked on holds Python 3.12 and the packages in GPU_MACHINE (with
what they need), reaches no package registry and receives only the checkout. So, here, beforehand:

  python bench/gpu_prepare.py             # wheels for what the project needs beyond GPU_MACHINE, and the data
  python bench/gpu_prepare.py --missing   # the requirements this interpreter lacks, one per line
  python bench/gpu_prepare.py --install SITE  # there: those, from the wheels, offline into SITE (then PYTHONPATH)
  python bench/gpu_prepare.py --venv DIR  # a virtualenv holding only GPU_MACHINE's packages (the rehearsal)

The wheels are the versions installed here (the ones the tests ran on), pure-Python where one is
published, else built for CPython 3.12 on x86-64 Linux. They go into .gpu_check/wheels and the
CIFAR-10 subset (or DATA_ROOT) into .gpu_check/data: git-ignored, the one folder that must travel.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path, PurePosixPath

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / ".gpu_check"  # git-ignored: wheels/ and the data
DATA = REPO.parent / "shared" / "datasets" / "cifar10-subset"
REQUIREMENTS = ("requirements.txt", "requirements-dev.txt")
# What the GPU machine holds (its image has more; these are the ones the check may count on).
GPU_MACHINE = ("torch", "torchvision", "pytorch-lightning", "torchmetrics", "tensorboard", "timm", "matplotlib",
               "scipy", "safetensors", "pyyaml", "tqdm", "pytest")
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
TOOLING = {"pip", "setuptools", "wheel"}  # every virtualenv brings its own


def read_requirements(names: tuple[str, ...] = REQUIREMENTS) -> list[Requirement]:
    """The project's requirement lines (comments, blank lines and `-r` includes left out)."""
    lines = []
    for name in names:
        for line in (REPO / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                lines.append(Requirement(line))
    return lines


def needs(requirement: Requirement, dist: metadata.Distribution) -> list[Requirement]:
    """What an installed distribution requires here, with the extras the requirement asked for."""
    extras = set(requirement.extras) | {""}
    wanted = []
    for text in dist.requires or []:
        need = Requirement(text)
        if need.marker is None or any(need.marker.evaluate({"extra": extra}) for extra in extras):
            wanted.append(need)
    return wanted


def closure(roots: list[Requirement], trusted: frozenset[str] = frozenset()
            ) -> tuple[dict[str, metadata.Distribution], list[str]]:
    """Every installed distribution the requirements pull in, and those missing or at a refused version.

    A trusted distribution's own requirements are not followed: the GPU machine's image is whole, and
    its packages may name theirs differently from the same packages here (CUDA 13 against 12 builds).
    """
    found: dict[str, metadata.Distribution] = {}
    missing: list[str] = []
    queue = list(roots)
    while queue:
        requirement = queue.pop()
        key = canonicalize_name(requirement.name)
        if key in found or key in TOOLING:
            continue
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            if str(requirement) not in missing:
                missing.append(str(requirement))
            continue
        if not requirement.specifier.contains(dist.version, prereleases=True):
            missing.append(f"{requirement} (found {dist.version})")
            continue
        found[key] = dist
        if key not in trusted:
            queue.extend(needs(requirement, dist))
    return found, missing


def gpu_machine() -> dict[str, metadata.Distribution]:
    """GPU_MACHINE's packages and what they need, as installed here."""
    return closure([Requirement(name) for name in GPU_MACHINE])[0]


def beyond_gpu_machine() -> list[str]:
    """`name==version` for each distribution the project needs that the GPU machine does not hold."""
    project, missing = closure(read_requirements())
    if missing:
        sys.exit("error: this environment lacks " + ", ".join(missing) + "; install the project first: "
                 "pip install -r requirements.txt -r requirements-dev.txt")
    there = gpu_machine()
    return sorted(f"{dist.metadata['Name']}=={dist.version}" for key, dist in project.items() if key not in there)


def download(pins: list[str], wheels: Path) -> None:
    """Each pin's wheel, without its requirements (each is pinned itself): a pure-Python one where the
    project publishes one, which installs on any Python, else the build for CPython 3.12 on x86-64 Linux."""
    shutil.rmtree(wheels, ignore_errors=True)  # one version of each: two would stop the install there
    wheels.mkdir(parents=True)
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", PYTHON, "-d", str(wheels)]
    pure = ["--implementation", "py", "--abi", "none", "--platform", "any"]
    built = ["--implementation", "cp", *[arg for platform in PLATFORMS for arg in ("--platform", platform)]]
    for pin in pins:
        if subprocess.run([*base, *pure, pin], capture_output=True).returncode and \
                subprocess.run([*base, *built, pin]).returncode:
            sys.exit(f"error: pip could not download a wheel of {pin} (is the package registry reachable?)")


def install(wheels: Path, site: Path) -> list[str]:
    """Install, offline into `site`, the prepared wheels of what this interpreter lacks; their names.

    Round by round: a wheel installed may need another that this machine lacks too.
    """
    sys.path.insert(0, str(site))
    trusted = frozenset(map(canonicalize_name, GPU_MACHINE))
    available = {canonicalize_name(path.name.split("-")[0]): path for path in wheels.glob("*.whl")}
    done: list[str] = []
    while missing := closure(read_requirements(), trusted)[1]:
        names = [canonicalize_name(Requirement(text.split(" (")[0]).name) for text in missing]
        lacking = [text for text, name in zip(missing, names) if name not in available or name in done]
        if lacking:
            sys.exit(f"error: this machine lacks {', '.join(lacking)} and {wheels} has no wheel that gives it; "
                     "run `bash bench/gpu_check.sh --prepare` where the package registry is reachable")
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", str(site), *(str(available[n]) for n in names)]
        if subprocess.run(command).returncode:
            sys.exit(f"error: pip could not install {' '.join(available[n].name for n in names)}")
        done += names
    return done


def copy_data(source: Path, target: Path) -> int:
    """The image folder the check trains on, copied in (again only when its file count changed)."""
    if not source.is_dir():
        sys.exit(f"error: {source} does not exist: pass the image folder with DATA_ROOT=...")
    count = sum(1 for path in source.rglob("*") if path.is_file())
    if not target.is_dir() or sum(1 for path in target.rglob("*") if path.is_file()) != count:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
    return count


def size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def prepare(folder: Path, data: Path) -> None:
    pins = beyond_gpu_machine()
    print(f"the GPU machine lacks: {' '.join(pins) or 'nothing'}")
    if pins:
        download(pins, folder / "wheels")
    images = copy_data(data, folder / "data")
    tree = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True).stdout.split(b"\0")
    checkout = sum((REPO / name.decode()).stat().st_size for name in tree if name and (REPO / name.decode()).is_file())
    where = folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder
    print(f"wheels: {folder / 'wheels'} ({len(pins)}); data: {folder / 'data'} ({images} files from {data})")
    print(f"travels: the checkout ({checkout / 2**20:.1f} MiB) and {where}/ ({size(folder) / 2**20:.1f} MiB)")
    print(f"run there, from the checkout, with {where} carried: OUT=<folder> bash bench/gpu_check.sh")


def make_venv(venv: Path) -> None:
    """A virtualenv holding only GPU_MACHINE's packages: links to this environment's installed copies.

    Linking rather than installing spares a second multi-GB torch; each file the venv sees is one that a
    GPU_MACHINE package (or one of its requirements) owns, so whatever else the project needs is absent.
    """
    keep = set(gpu_machine())
    site = Path(sysconfig.get_paths()["purelib"])
    owners: dict[PurePosixPath, set[str]] = {}  # each path under site-packages -> the distributions owning it
    for dist in metadata.distributions(path=[str(site)]):
        key = canonicalize_name(dist.metadata["Name"])
        for file in dist.files or []:
            path = PurePosixPath(file)
            if path.parts[0] == ".." or "__pycache__" in path.parts:
                continue
            for depth in range(1, len(path.parts) + 1):
                owners.setdefault(PurePosixPath(*path.parts[:depth]), set()).add(key)
    children: dict[PurePosixPath, list[PurePosixPath]] = {}
    for path in owners:
        children.setdefault(path.parent, []).append(path)

    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    target = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; "
                                  "print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())

    def place(path: PurePosixPath) -> None:
        mine = owners[path] & keep
        if not mine:
            return
        if owners[path] <= keep or path not in children:  # all of it kept, or one file
            (target / path).symlink_to(site / path)
            return
        (target / path).mkdir()  # shared with a package the GPU machine lacks: only the kept part
        for child in children[path]:
            place(child)

    for top in children[PurePosixPath(".")]:
        place(top)
    print(f"{venv}: {len(keep)} distributions linked from {site}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--missing", action="store_true", help="print the requirements this interpreter lacks")
    parser.add_argument("--venv", type=Path, help="make a virtualenv holding only the GPU machine's packages")
    parser.add_argument("--install", type=Path, metavar="SITE", help="install the missing wheels into SITE")
    parser.add_argument("--folder", type=Path, default=Path(os.environ.get("GPU_CHECK_DIR", FOLDER)))
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DATA_ROOT", DATA)))
    args = parser.parse_args()
    if args.missing:
        print("\n".join(closure(read_requirements(), frozenset(map(canonicalize_name, GPU_MACHINE)))[1]))
    elif args.install:
        names = install(args.folder.resolve() / "wheels", args.install.resolve())
        print(f"installed from the wheels into {args.install}: {' '.join(names) or 'nothing (none missing)'}")
    elif args.venv:
        make_venv(args.venv.resolve())
    else:
        prepare(args.folder.resolve(), args.data.resolve())


if __name__ == "__main__":
    main()
