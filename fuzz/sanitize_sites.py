"""The two instructions of each racecheck hazard: racecheck names a hazard by kernel offsets
("Race reported between Read access at KERNEL+0x150 in forward.py:273 and Write access at
KERNEL+0xbf00 ..."); this finds the kernel's cubin in the sweep's Triton cache and prints the SASS
instruction at each offset, so a reader sees which shared-memory accesses race (core's tiles, or the
compiler's own bookkeeping such as the warp-specialize switch loop's state bytes) without a GPU.

    python -m fuzz.sanitize_sites LOG [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# "Race reported between Read access at hopper_attention_forward_kernel+0x150 in forward.py:273"
# "    and Write access at hopper_attention_forward_kernel+0xbf00 in forward.py:326 [11 hazards]"
_ACCESS = re.compile(r"(Read|Write) access at (\w+)\+0x([0-9a-f]+) in (\S+)")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


@dataclass(frozen=True)
class Site:
    kernel: str
    offset: int
    kind: str  # Read or Write
    source: str  # file:line racecheck attributes the access to


def hazard_sites(log_text: str) -> list[Site]:
    """Every access racecheck names in a log, once each, in order of first appearance."""
    seen: dict[tuple[str, int, str], Site] = {}
    for kind, kernel, offset, source in _ACCESS.findall(log_text):
        site = Site(kernel, int(offset, 16), kind, source)
        seen.setdefault((site.kernel, site.offset, site.kind), site)
    return list(seen.values())


def instructions(sass_text: str) -> dict[int, str]:
    """offset -> instruction of cuobjdump -sass output (its encoding comments dropped)."""
    return {int(offset, 16): " ".join(text.split()) for offset, text in _SASS_LINE.findall(sass_text)}


# Instructions that touch shared memory, the only ones racecheck reports.
_SHARED_ACCESS = re.compile(r"\b(LDS|STS|LDSM|STSM|ATOMS|SYNCS|HGMMA|UTMA\w*|UBLKCP)\b")


def variant_sass(kernel: str, cache_dir: Path, sites: list[Site]) -> tuple[dict[int, str], str]:
    """(offset -> instruction, note) of the compiled variant of `kernel` that the sites come from. A Triton
    cache holds one cubin per variant (causal or not, head dims, ...) and the log does not say which ran:
    the variant is the one with a shared-memory access at every site's offset (the newest if several)."""
    cubins = sorted(cache_dir.rglob(f"{kernel}.cubin"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not cubins:
        return {}, f"no cubin of {kernel} in {cache_dir}"
    for cubin in cubins:
        sass = instructions(disassemble(cubin))
        if all(_SHARED_ACCESS.search(sass.get(s.offset, "")) for s in sites):
            return sass, f"{cubin.parent.name}, of {len(cubins)} variants"
    newest = instructions(disassemble(cubins[0]))
    return newest, "no variant has shared-memory accesses at every site: the newest"


def disassemble(cubin: Path) -> str:
    """SASS of a cubin with the cuobjdump that Triton ships."""
    from triton.backends.nvidia import compiler

    cuobjdump = Path(compiler.__file__).parent / "bin" / "cuobjdump"
    command = [str(cuobjdump), "-sass", str(cubin)]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def describe(sites: list[Site], sass: dict[int, str]) -> list[str]:
    """One line per site: kind, offset, source line, instruction."""
    return [
        f"{s.kind:5} +0x{s.offset:x} ({s.source}): {sass.get(s.offset, 'no instruction at this offset')}"
        for s in sites
    ]


def annotate(log_path: Path, cache_dir: Path) -> list[str]:
    """The described sites of one racecheck log, kernel by kernel ([] when it names none)."""
    sites = hazard_sites(log_path.read_text(errors="replace"))
    lines = []
    for kernel in dict.fromkeys(s.kernel for s in sites):
        own = [s for s in sites if s.kernel == kernel]
        sass, note = variant_sass(kernel, cache_dir, own)
        lines += [f"{kernel} ({note}):", *("  " + line for line in describe(own, sass))]
    return lines


def main(argv: list[str] | None = None) -> int:
    summary = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m fuzz.sanitize_sites", description=summary)
    parser.add_argument("log", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=Path(".hypothesis") / "sanitize-triton-cache")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print("\n".join(annotate(args.log, args.cache_dir)) or "no hazard sites in the log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
